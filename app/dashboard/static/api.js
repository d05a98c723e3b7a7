// The API key, API calls, polling with backoff, and DOM helpers that insert job text as text only.

const KEY = "squeeze.apiKey";  // sessionStorage: gone when the tab closes, never sent to another site

export const apiKey = {
  get: () => sessionStorage.getItem(KEY),
  set: key => sessionStorage.setItem(KEY, key),
  forget: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, body) {
    super(body && body.detail ? body.detail : `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
  }
}

const authListeners = [];
export function onAuthProblem(listener) { authListeners.push(listener); }

// options.json: a body sent as JSON; options.form: a FormData (multipart upload).
export async function api(path, {method = "GET", json, form} = {}) {
  const key = apiKey.get();
  // Without a key (a server with auth off) an upload still needs a header no cross-site HTML form can
  // send (app/http_guards.py): any bearer token does; with auth on it is a 401, as no key would be.
  const headers = key ? {"Authorization": `Bearer ${key}`} : form ? {"Authorization": "Bearer none"} : {};
  let body;
  if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
  if (form !== undefined) body = form;
  const response = await fetch(path, {method, headers, body});
  authListeners.forEach(listener => listener(response.status === 401));
  const payload = response.status === 204 ? null : await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, payload);
  return payload;
}

// Calls `step` again and again: soon after a change, slower while nothing changes (up to maxMs),
// slower still after errors. `step` returns true when what it watches changed, "stop" to end.
export function poll(step, {minMs = 1000, maxMs = 10000} = {}) {
  let delay = minMs, timer = null, stopped = false;
  async function tick() {
    if (stopped) return;
    let outcome;
    try { outcome = await step(); } catch { outcome = "error"; }
    if (stopped || outcome === "stop") return;
    if (outcome === true) delay = minMs;
    else delay = Math.min(outcome === "error" ? delay * 2 : delay * 1.5, outcome === "error" ? 3 * maxMs : maxMs);
    timer = setTimeout(tick, delay);
  }
  tick();
  return {
    stop() { stopped = true; clearTimeout(timer); },
    now() { clearTimeout(timer); delay = minMs; tick(); },
  };
}

// el("td", {class: "num"}, "text", child): strings become text nodes, never markup.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    node.setAttribute(name, value === true ? "" : String(value));
  }
  node.append(...children.flat().filter(c => c !== null && c !== undefined && c !== false)
    .map(c => (c instanceof Node ? c : document.createTextNode(String(c)))));
  return node;
}

export function methodSummary(spec) {
  const parts = [];
  const q = spec.quantization, s = spec.sparsity, c = spec.compensation;
  const sized = spec.target && spec.target.bits_per_weight != null;  // bits, groups and ranks chosen per Linear
  if (q && sized) parts.push(`${q.method.toUpperCase()} to ${spec.target.bits_per_weight} bits/weight (${spec.target.engine})`);
  else if (q) parts.push(`${q.method.toUpperCase()} ${q.bits}-bit${q.group_size === -1 ? " per-channel" : ` g${q.group_size}`}`);
  if (s) parts.push(`${s.method} ${s.pattern || `${Math.round(s.ratio * 100)}%`}`);
  if (c && c.method !== "none") {
    const rank = c.rank ? `r${c.rank}` : !c.rank_budget ? "ranks per Linear"
      : c.rank_budget.params ? `budget ${c.rank_budget.params} params` : `budget ${c.rank_budget.fraction}`;
    parts.push(`${c.method === "eora" ? "EoRA" : "SVD"} ${rank}${c.adapter_bits ? ` (${c.adapter_bits}-bit)` : ""}`);
  }
  return parts.join(" + ");
}

// The weight bits the spec asks for (16 when only pruned; a size target's bits per weight): a nominal
// figure, not counted from files.
export function nominalBits(spec) {
  if (spec.target && spec.target.bits_per_weight != null) return spec.target.bits_per_weight;
  return spec.quantization ? spec.quantization.bits : 16;
}

// Stored bits per decoder-Linear weight, counted from the artifact's files (codes, scales, zero points,
// adapter as stored); null for jobs finished before the worker reported it.
export function storedBits(job) {
  const size = job.metrics && job.metrics.size;
  return size && size.bits_per_weight_stored != null ? size.bits_per_weight_stored : null;
}

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(n < 10 ? 2 : 1) : n} ${units[i]}`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 60) return `${seconds}s`;
  const m = Math.floor(seconds / 60), s = seconds % 60;
  if (m < 60) return `${m}m ${String(s).padStart(2, "0")}s`;
  return `${Math.floor(m / 60)}h ${String(m % 60).padStart(2, "0")}m`;
}

export function age(iso) { return `${duration((Date.now() - Date.parse(iso)) / 1000)} ago`; }

export function jobDuration(job) {
  if (!job.started_at) return null;
  const end = job.finished_at ? Date.parse(job.finished_at) : Date.now();
  return (end - Date.parse(job.started_at)) / 1000;
}

export function perplexity(metrics) {
  if (!metrics || metrics.perplexity_after === undefined) return "–";
  return `${metrics.perplexity_before.toFixed(2)} → ${metrics.perplexity_after.toFixed(2)}`;
}

// Another view of this page, with its own URL (app.js routes on popstate).
export function navigate(path) {
  history.pushState(null, "", path);
  window.dispatchEvent(new PopStateEvent("popstate"));
}

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
