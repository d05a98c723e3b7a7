// Compare: the finished jobs of one model on a perplexity-vs-size chart with their Pareto front.
import {api, bytes, el, methodSummary, navigate, nominalBits, storedBits} from "./api.js";
import {paretoChart, paretoFront} from "./charts.js";

const MAX_PAGES = 10;

async function succeededJobs(model) {
  const jobs = [];
  let cursor = null;
  for (let page = 0; page < MAX_PAGES; page++) {
    const query = new URLSearchParams({status: "succeeded", limit: "200", model});
    if (cursor) query.set("cursor", cursor);
    const result = await api(`/v1/job-search?${query}`);
    jobs.push(...result.items);
    cursor = result.next_cursor;
    if (!cursor) break;
  }
  return jobs;
}

export function compareView(root, model) {
  const input = el("input", {id: "compare-model", type: "text", value: model || "", placeholder: "model id",
    "aria-label": "model id"});
  const out = el("div", {id: "compare"});
  const form = el("form", {class: "toolbar"}, el("label", {}, "Model ", input), el("button", {}, "Compare"));
  root.append(el("h1", {}, "Compare finished jobs of one model"), form, out);
  form.addEventListener("submit", event => {
    event.preventDefault();
    navigate(`/compare?model=${encodeURIComponent(input.value.trim())}`);
  });
  (model ? showModel(out, model) : showModels(out)).catch(error => {
    out.replaceChildren(el("p", {class: "error"}, `Could not load jobs: ${error.message}`));
  });
  return () => {};
}

async function showModels(out) {
  const jobs = (await api("/v1/job-search?status=succeeded&limit=200")).items;
  const counts = new Map();
  for (const job of jobs) counts.set(job.spec.model.id, (counts.get(job.spec.model.id) || 0) + 1);
  out.replaceChildren(el("p", {class: "muted"}, "Models with finished jobs among the newest 200:"),
    el("ul", {}, [...counts].map(([id, n]) => el("li", {},
      el("a", {href: `/compare?model=${encodeURIComponent(id)}`, class: "ids"}, id), ` (${n})`))));
}

async function showModel(out, model) {
  const jobs = (await succeededJobs(model)).filter(j => j.spec.model.id === model && j.metrics);
  if (!jobs.length) { out.replaceChildren(el("p", {}, "No finished jobs of this model.")); return; }
  // Counted sizes (weights and adapter in one number) when every job has them; else the spec's bits and
  // the adapter's bytes side by side (jobs from before sizes were counted).
  const counted = jobs.every(job => storedBits(job) !== null);
  const points = jobs.map(job => ({
    id: job.id, label: methodSummary(job.spec), ppl: job.metrics.perplexity_after,
    size: counted ? storedBits(job) : nominalBits(job.spec),
    adapterBytes: job.metrics.adapter ? job.metrics.adapter.stored_bytes : 0,
  }));
  for (const p of points) p.adapter = counted ? 0 : p.adapterBytes;  // in `size` already when counted
  const front = new Set(paretoFront(points));
  const before = jobs.map(j => j.metrics.perplexity_before);
  const sizeWords = counted
    ? "stored bits per weight, counted from each artifact's files (adapter included); a job is on the Pareto "
      + "front when no other job is as small or smaller and as good or better, and strictly one of them. "
    : "the weight bits each spec asks for and the adapter's stored bytes (some jobs predate counted sizes); a job "
      + "is on the Pareto front when no other job has fewer or equal weight bits, adapter bytes and perplexity, and "
      + "less of one. ";
  out.replaceChildren(
    el("p", {class: "ids"}, model),
    el("p", {class: "muted"}, `${jobs.length} finished jobs. Size: ` + sizeWords
      + `Perplexity before compression: ${Math.min(...before).toFixed(3)}`
      + (Math.max(...before) !== Math.min(...before) ? `–${Math.max(...before).toFixed(3)} (evaluation sets differ)` : "")),
    el("div", {class: "legend"}, el("span", {}, el("span", {class: "swatch optimal"}), "on the Pareto front"),
      el("span", {class: "muted"}, "grey: dominated")),
    el("div", {id: "pareto-chart"}, paretoChart(points, counted ? "stored bits per weight (counted from the files)"
      : "weight bits per weight (from the spec)")),
    el("div", {class: "scroll"}, el("table", {id: "compare-table"},
      el("thead", {}, el("tr", {}, ["job", "method", counted ? "stored bits/weight" : "weight bits", "adapter stored",
        "perplexity after", "Pareto front"]
        .map(h => el("th", {}, h)))),
      el("tbody", {}, points.sort((a, b) => a.size - b.size || a.adapter - b.adapter || a.ppl - b.ppl).map(p =>
        el("tr", {"data-job": p.id, class: front.has(p) ? "on-front" : ""},
          el("td", {}, el("a", {href: `/jobs/${p.id}`, class: "ids"}, p.id.slice(0, 8))), el("td", {}, p.label),
          el("td", {class: "num"}, counted ? p.size.toFixed(3) : p.size),
          el("td", {class: "num"}, bytes(p.adapterBytes)),
          el("td", {class: "num"}, p.ppl.toFixed(3)), el("td", {}, front.has(p) ? "yes" : "no")))))));
}
