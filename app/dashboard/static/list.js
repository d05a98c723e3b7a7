// The job list: filter by status, search by model, cursor pages, live by polling with backoff.
import {age, api, bytes, duration, el, jobDuration, methodSummary, nominalBits, perplexity, poll, storedBits}
  from "./api.js";

export function sizeSummary(job) {
  const stored = storedBits(job);
  if (stored !== null) return `${stored.toFixed(2)} bits/weight`;
  const adapter = job.metrics && job.metrics.adapter;
  const bits = `${nominalBits(job.spec)}-bit weights`;
  return adapter ? `${bits} + adapter ${bytes(adapter.stored_bytes)}` : bits;
}

function row(job) {
  const p = job.progress;
  const layer = p.layers ? ` · layer ${p.layer || 0}/${p.layers}` : "";
  const fill = el("div");
  fill.style.width = `${p.percent}%`;
  return el("a", {class: "job", href: `/jobs/${job.id}`, "data-id": job.id},
    el("span", {class: `status status-${job.status}`}, job.status),
    el("span", {class: "model ids"}, job.spec.model.id),
    el("span", {}, methodSummary(job.spec)),
    el("span", {class: "size"}, sizeSummary(job)),
    job.status === "running" || job.status === "queued"
      ? el("span", {}, el("div", {class: "bar"}, fill), el("span", {class: "muted"}, `${p.stage}${layer}`))
      : el("span", {class: "ppl"}, perplexity(job.metrics)),
    el("span", {class: "muted"}, age(job.created_at)),
    el("span", {class: "muted"}, duration(jobDuration(job))));
}

export function listView(root) {
  const status = el("select", {id: "status-filter", "aria-label": "status"},
    ["", "queued", "running", "succeeded", "failed", "cancelled"].map(s => el("option", {value: s}, s || "all")));
  const search = el("input", {id: "model-search", type: "search", placeholder: "model contains…", "aria-label": "model"});
  const jobs = el("div", {class: "jobs", id: "jobs"});
  const pager = el("div", {class: "actions"});
  const message = el("p", {class: "muted", id: "list-message"});
  root.append(el("h1", {}, "Compression jobs"),
    el("div", {class: "toolbar"}, el("label", {}, "Status ", status), el("label", {}, "Model ", search),
      el("a", {href: "/submit"}, "New job…")),
    el("p", {class: "muted"}, "Size: stored bits per decoder-Linear weight, counted from the artifact's files "
      + "(codes, scales, zero points and the adapter as stored); before a job finishes, the bits its spec asks for. "
      + "Perplexity: before → after."),
    message, jobs, pager);

  const cursors = [null];  // cursors[i]: the cursor that fetches page i
  let page = 0, last = "";

  async function load() {
    const query = new URLSearchParams({limit: "25"});
    if (status.value) query.set("status", status.value);
    if (search.value.trim()) query.set("model", search.value.trim());
    if (cursors[page]) query.set("cursor", cursors[page]);
    let result;
    try { result = await api(`/v1/job-search?${query}`); }
    catch (error) { message.textContent = `Could not load jobs: ${error.message}`; throw error; }
    cursors[page + 1] = result.next_cursor;
    const text = JSON.stringify(result);
    message.textContent = result.items.length ? "" : "No jobs match.";
    jobs.replaceChildren(
      el("div", {class: "job jobs-head"}, ["status", "model", "method", "size", "progress · perplexity", "age",
        "duration"].map(h => el("span", {}, h))),
      ...result.items.map(row));
    pager.replaceChildren(
      page > 0 ? el("button", {type: "button", id: "newer"}, "← Newer") : "",
      el("span", {class: "muted"}, `page ${page + 1}`),
      result.next_cursor ? el("button", {type: "button", id: "older"}, "Older →") : "");
    pager.querySelector("#newer")?.addEventListener("click", () => { page--; poller.now(); });
    pager.querySelector("#older")?.addEventListener("click", () => { page++; poller.now(); });
    const changed = text !== last;
    last = text;
    return changed;
  }

  const restart = () => { page = 0; cursors.length = 1; poller.now(); };
  status.addEventListener("change", restart);
  let typing;
  search.addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(restart, 250); });
  const poller = poll(load, {minMs: 1000, maxMs: 10000});
  return () => { poller.stop(); clearTimeout(typing); };
}
