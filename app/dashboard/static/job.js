// One job: progress with ETA, the live event log, and once done its metrics, chart, sizes, artifact and webhooks.
import {api, bytes, duration, el, jobDuration, methodSummary, nominalBits, poll, TERMINAL} from "./api.js";
import {servingSection} from "./artifacts.js";
import {moduleErrorChart} from "./charts.js";
import {deliveriesView} from "./deliveries.js";

function eta(job) {
  const p = job.progress.percent;
  if (job.status !== "running" || !job.started_at || p < 5) return "estimating…";
  const elapsed = (Date.now() - Date.parse(job.started_at)) / 1000;
  return `about ${duration(elapsed * (100 - p) / p)} left`;
}

function card(label, value, id) {
  return el("div", {class: "card"}, el("div", {class: "label"}, label), el("div", {class: "value", id}, value));
}

function fmt(value, digits = 4) {
  return value === null || value === undefined ? "–" : Number(value).toPrecision(digits);
}

function layerOf(name) {
  const match = name.match(/\.(\d+)\./);
  return match ? Number(match[1]) : 0;
}

// "rank 4: 80 modules; rank 2: 4 modules", most common first; `label` names one value.
function countSummary(values, label) {
  const counts = new Map();
  for (const value of values) counts.set(value, (counts.get(value) || 0) + 1);
  return [...counts].sort((a, b) => b[1] - a[1])
    .map(([value, n]) => `${label(value)}: ${n} module${n === 1 ? "" : "s"}`).join("; ");
}

const rankLabel = rank => `rank ${rank}`;
const bitsLabel = bits => `${bits}-bit`;
const groupLabel = size => (size === -1 ? "per output channel" : `groups of ${size}`);
const adapterLabel = bits => (bits == null ? "fp16 adapter" : `${bits}-bit adapter`);

// A module's adapter as stored: none (rank 0), fp16 factors, or group-wise integer codes of adapter_bits.
function adapterCell(module) {
  if (!module.rank || !("adapter_bits" in module)) return "–";  // older jobs did not record it per module
  return module.adapter_bits == null ? "fp16" : `${module.adapter_bits}-bit`;
}

function sizedTarget(job) {
  return job.spec.target && job.spec.target.bits_per_weight != null ? job.spec.target : null;
}

// A module's group size as quantized: per channel, it is the whole input row (the metrics hold its width).
function groupCell(module, job) {
  if (module.group_size == null) return "–";
  const chosen = job.metrics.target && job.metrics.target.modules[module.name];
  const asked = chosen ? chosen.group_size : job.spec.quantization && job.spec.quantization.group_size;
  if (module.group_size === -1) return "per channel";
  return asked === -1 ? `${module.group_size} (per channel)` : String(module.group_size);
}

function failure(job) {
  const where = job.progress.stage && job.progress.stage !== "failed" ? ` while ${job.progress.stage}` : "";
  return el("div", {class: "failure", id: "failure"},
    el("strong", {}, `This job failed${where} (attempt ${job.attempt} of ${job.max_attempts}).`), " ",
    el("span", {}, job.error || "No reason was recorded."));
}

function metricsSection(job) {
  const m = job.metrics, c = m.compression || {};
  const modules = Object.entries(c.per_module || {}).map(([name, s]) => ({name, layer: layerOf(name), ...s}));
  const section = el("section", {id: "results"},
    el("h2", {}, "Quality"),
    el("div", {class: "cards"},
      card("perplexity before", m.perplexity_before.toFixed(3), "ppl-before"),
      card("perplexity after", m.perplexity_after.toFixed(3), "ppl-after"),
      card("after / before", fmt(m.perplexity_ratio)),
      card("mean relative error before compensation", fmt(c.mean_relative_error_before, 3)),
      card("mean relative error after compensation", fmt(c.mean_relative_error_after, 3)),
      card("export check: max |logit diff|", fmt(m.verification && m.verification.max_abs_diff, 3))));
  if (modules.length) {
    const anyAfter = modules.some(x => x.error_after !== null);
    section.append(el("h2", {}, "Relative output error per module"),
      el("div", {class: "legend"}, el("span", {}, el("span", {class: "swatch before"}), "before compensation (compressed only)"),
        anyAfter ? el("span", {}, el("span", {class: "swatch after"}), "after compensation") : el("span", {class: "muted"}, "no compensation in this job")),
      el("div", {id: "module-chart"}, moduleErrorChart(modules)),
      el("h2", {}, sizedTarget(job) ? "Bits and ranks (chosen per module by the size target)" : "Ranks"),
      sizedTarget(job) ? el("p", {id: "bits-summary"}, countSummary(modules.map(x => x.bits), bitsLabel)) : "",
      el("p", {id: "rank-summary"}, countSummary(modules.map(x => x.rank), rankLabel)),
      sizedTarget(job) && modules.some(x => x.rank) ? el("p", {id: "adapter-summary"},
        countSummary(modules.filter(x => x.rank).map(x => x.adapter_bits), adapterLabel)) : "",
      el("details", {}, el("summary", {}, `Per module: errors, bits, group size, rank, adapter and zeros (${modules.length} modules)`),
        el("div", {class: "scroll"}, el("table", {id: "modules"},
        el("thead", {}, el("tr", {}, el("th", {}, "module"), el("th", {class: "num"}, "error before"),
          el("th", {class: "num"}, "error after"), el("th", {class: "num"}, "reduction"), el("th", {class: "num"}, "rank"),
          el("th", {class: "num"}, "zeros"), el("th", {class: "num"}, "bits"), el("th", {class: "num"}, "group size"),
          el("th", {class: "num"}, "adapter"))),
        el("tbody", {}, modules.map(x => el("tr", {},
          el("td", {class: "ids"}, x.name), el("td", {class: "num"}, fmt(x.error_before, 3)),
          el("td", {class: "num"}, fmt(x.error_after, 3)),
          el("td", {class: "num"}, x.error_after === null ? "–" : `${(100 * (1 - x.error_after / x.error_before)).toFixed(1)}%`),
          el("td", {class: "num"}, x.rank), el("td", {class: "num"}, `${(100 * x.zero_fraction).toFixed(1)}%`),
          el("td", {class: "num"}, x.bits ?? "–"),
          el("td", {class: "num"}, groupCell(x, job)), el("td", {class: "num"}, adapterCell(x)))))))));
  }
  section.append(sizeSection(job), servingSection(job), timingSection(m));
  return section;
}

// What the size target asked for, what its plan stores and what the files hold.
function targetSentence(target, size) {
  const stored = size && size.bits_per_weight_stored != null
    ? `; counted from the artifact's files: ${size.bits_per_weight_stored.toFixed(3)}` : "";
  return `Size target: ${target.bits_per_weight} bits per weight (engine ${target.engine}). The plan stores `
    + `${target.planned_bits_per_weight.toFixed(3)} (${target.planned_bytes.toLocaleString()} of `
    + `${target.budget_bytes.toLocaleString()} bytes, ${target.optimal ? "optimal" : `within ${target.gap.toPrecision(3)} of the optimum`}, `
    + `${target.sensitivity} sensitivity)${stored}.`;
}

function sizeSection(job) {
  const q = job.spec.quantization, a = job.metrics.adapter, size = job.metrics.size, target = job.metrics.target;
  const counted = key => size ? bytes(size[key]) : "not reported (a job from before sizes were counted)";
  const perWeight = key => size && size.linear_weights ? ` (${(8 * size[key] / size.linear_weights).toFixed(3)} bits/weight)` : "";
  const chosen = target ? Object.values(target.modules) : [];
  const rows = [
    ["weights (codes)", q && target ? `chosen per Linear by the size target: ${countSummary(chosen.map(m => m.bits), bitsLabel)}; `
      + `${countSummary(chosen.map(m => m.group_size), groupLabel)}; ${q.symmetric ? "symmetric" : "asymmetric"}`
      : q ? `${q.bits}-bit codes, ${groupLabel(q.group_size)}, `
      + `${q.symmetric ? "symmetric" : "asymmetric"}` : "not quantized (dense weights as stored)",
      counted("codes_bytes") + perWeight("codes_bytes")],
    ["scales", q ? "one per group" : "none", counted("scales_bytes") + perWeight("scales_bytes")],
    ["zero points", q ? (q.symmetric ? "none (symmetric)" : "one per group, packed") : "none",
      counted("zero_points_bytes") + perWeight("zero_points_bytes")],
    ["adapter, stored", a ? `${a.params.toLocaleString()} params as ${a.stored_dtype}` : "no adapter",
      a ? `${bytes(a.stored_bytes)} (${a.stored_bits_per_param.toFixed(2)} bits/param), counted from ${a.file}` : "–"],
    ["adapter, served", a ? "as an engine holds it in memory (fp16)" : "no adapter",
      a ? `${bytes(a.served_bytes)} (${a.served_bits_per_param.toFixed(2)} bits/param)` : "–"],
  ];
  const total = size && size.bits_per_weight_stored != null
    ? `Stored: ${size.bits_per_weight_stored.toFixed(3)} bits per weight over ${size.linear_weights.toLocaleString()} `
      + `decoder-Linear weights; served (adapter in fp16): ${size.bits_per_weight_served.toFixed(3)}. `
      + "Counted tensor by tensor from the artifact's files."
    : `Nominal weight bits from the spec: ${nominalBits(job.spec)}; this job's stored sizes were not counted.`;
  return el("section", {id: "sizes"}, el("h2", {}, "Size breakdown"),
    target ? el("p", {id: "target-summary"}, targetSentence(target, size)) : "",
    el("div", {class: "scroll"}, el("table", {},
      el("thead", {}, el("tr", {}, el("th", {}, "part"), el("th", {}, "what"), el("th", {}, "size"))),
      el("tbody", {}, rows.map(r => el("tr", {}, r.map(v => el("td", {}, v))))))),
    el("p", {class: "muted", id: "bits-per-weight"}, total));
}

function timingSection(m) {
  const t = m.timings || {};
  return el("section", {}, el("h2", {}, "Timings"),
    el("div", {class: "cards"}, Object.entries(t).map(([k, v]) => card(k.replace(/_s$/, ""), duration(v)))));
}

export function jobView(root, id) {
  const title = el("h1", {}, "Job ", el("span", {class: "ids"}, id));
  const head = el("div", {id: "job-head"});
  const fill = el("div");
  const bar = el("div", {class: "bar big", id: "progress-bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100}, fill);
  const progressText = el("div", {id: "progress-text"});
  const actions = el("div", {class: "actions"});
  const body = el("div", {id: "job-body"});
  const log = el("div", {class: "log", id: "events", "aria-live": "polite"});
  const webhooks = el("div");
  root.append(title, head, bar, progressText, actions, body, webhooks, el("h2", {}, "Events"), log);

  let lastShown = "", lastState = "", after = 0, finished = false, deliveries = null;

  function render(job) {
    const p = job.progress;
    head.replaceChildren(
      el("p", {}, el("span", {class: `status status-${job.status}`, id: "job-status"}, job.status),
        job.cancel_requested && !TERMINAL.has(job.status) ? " (cancel requested)" : "",
        ` · ${methodSummary(job.spec)} · created ${new Date(job.created_at).toLocaleString()}`
        + (job.started_at ? ` · ran ${duration(jobDuration(job))}` : "")
        + (job.memory_class && job.memory_class !== "any" ? ` · memory class ${job.memory_class}` : "")),
      el("p", {}, "Model ", el("span", {class: "ids", id: "job-model"}, job.spec.model.id),
        ` @ ${job.spec.model.revision}`));
    fill.style.width = `${p.percent}%`;
    bar.setAttribute("aria-valuenow", p.percent);
    progressText.textContent = `${p.stage}` + (p.layers ? ` · layer ${p.layer || 0} of ${p.layers}` : "")
      + ` · ${p.percent.toFixed(0)}%` + (job.status === "running" ? ` · ${eta(job)}` : "");
    const cancellable = (job.status === "queued" || job.status === "running") && !job.cancel_requested;
    actions.replaceChildren(
      cancellable ? el("button", {type: "button", id: "cancel"}, "Cancel") : "",
      el("a", {href: `/submit?from=${job.id}`, id: "resubmit"}, "Submit again with changes"),
      el("a", {href: `/compare?model=${encodeURIComponent(job.spec.model.id)}`}, "Compare with this model's jobs"));
    actions.querySelector("#cancel")?.addEventListener("click", async event => {
      event.target.disabled = true;
      try { render(await api(`/v1/jobs/${id}/cancel`, {method: "POST"})); } catch (error) { progressText.textContent = error.message; }
      poller.now();
    });
    // The results only change when the job does: rebuild them on a status change, not on every poll.
    if (job.status !== lastShown) {
      body.replaceChildren(
        job.status === "failed" ? failure(job) : "",
        job.status === "succeeded" && job.metrics ? metricsSection(job) : "");
      lastShown = job.status;
    }
    if (job.spec.webhook_url && !deliveries) {
      deliveries = deliveriesView(id, job.spec.webhook_url);
      webhooks.append(deliveries.node);
    }
    if (deliveries && TERMINAL.has(job.status)) deliveries.jobEnded();
  }

  async function appendEvents() {
    const page = await api(`/v1/jobs/${id}/events?after=${after}`);
    const follow = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    for (const e of page.items) {
      log.append(el("div", {class: e.level}, `${new Date(e.created_at).toLocaleTimeString()}  [${e.stage}] ${e.message}`));
    }
    after = page.next_after;
    if (follow) log.scrollTop = log.scrollHeight;
    return page.items.length > 0;
  }

  const poller = poll(async () => {
    let job;
    try { job = await api(`/v1/jobs/${id}`); }
    catch (error) {
      if (error.status === 404) { body.replaceChildren(el("p", {class: "error"}, "No such job for this API key.")); return "stop"; }
      throw error;
    }
    const state = JSON.stringify([job.status, job.progress, job.cancel_requested]);
    render(job);
    const newEvents = await appendEvents();
    if (TERMINAL.has(job.status)) {
      if (finished) return "stop";  // one more round after the end picks up the last events
      finished = true;
    }
    const changed = newEvents || state !== lastState;
    lastState = state;
    return changed;
  }, {minMs: 700, maxMs: 8000});
  return () => { poller.stop(); deliveries?.stop(); };
}
