"""What inference engines load, as facts shared by the job spec's checks (app/, no torch) and the export.

vLLM (compressed-tensors WNA16 scheme, LoRA): 4- and 8-bit integer weights; --max-lora-rank accepts only
VLLM_LORA_RANKS; the Linears it fuses into one layer (its packed_modules_mapping for LLaMA-like models)
must share one quantization scheme; it holds LoRA weights in fp16.
"""

VLLM_WNA16_BITS = (4, 8)
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
VLLM_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
