// A succeeded job's artifact: where it went, which engines serve it (squeeze.json's "serving" table, which
// the worker copies into the job's artifacts), the export's notes, and its files as downloads.
import {ApiError, apiKey, el} from "./api.js";

const yesNo = value => (value ? "yes" : "no");

// What an engine entry says beyond whether it loads: "scheme: W4A16 (...)", "reason: ...", a recipe.
function details(entry) {
  return Object.entries(entry).filter(([key]) => !["loads", "serves", "adapter", "lora"].includes(key))
    .map(([key, value]) => `${key.replace(/_/g, " ")}: ${value}`).join("; ");
}

// An entry with "adapter" (PEFT) loads the adapter onto a base model, not the checkpoint; "lora" says
// whether an engine that serves the checkpoint also takes the adapter, and with which flags.
function adapterCell(entry) {
  if ("adapter" in entry) return `${yesNo(entry.loads)} (${entry.adapter}/)`;
  if (!("lora" in entry)) return "–";
  return entry.lora ? `yes (--enable-lora --max-lora-rank ${entry.lora.max_lora_rank})` : "no";
}

function servingTable(serving) {
  return el("div", {class: "scroll"}, el("table", {id: "serving"},
    el("thead", {}, el("tr", {}, el("th", {}, "engine"), el("th", {}, "loads the checkpoint"),
      el("th", {}, "loads the adapter"), el("th", {}, "how, or why not"))),
    el("tbody", {}, Object.entries(serving).map(([engine, entry]) => el("tr", {"data-engine": engine},
      el("td", {}, engine), el("td", {}, "adapter" in entry ? "–" : yesNo(entry.loads ?? entry.serves)),
      el("td", {}, adapterCell(entry)), el("td", {}, details(entry)))))));
}

function filePath(path) {
  return path.split("/").map(encodeURIComponent).join("/");
}

// The API wants the bearer key, which a plain link cannot send: fetch the file, hand the browser a blob.
async function download(jobId, path) {
  const key = apiKey.get();
  const response = await fetch(`/v1/jobs/${jobId}/artifacts/${filePath(path)}`,
    {headers: key ? {"Authorization": `Bearer ${key}`} : {}});
  if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
  const url = URL.createObjectURL(await response.blob());
  const link = el("a", {href: url, download: path.split("/").pop()});
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);  // revoked at once, some browsers drop the download
}

// local: files download through the API; hf:// files link to the Hub at the published commit; s3:// as text.
function fileList(jobId, art) {
  const state = el("span", {class: "muted", id: "download-state"});
  const local = (art.uri || "").startsWith("local:");
  const hub = (art.uri || "").match(/^hf:\/\/([^@]+)@(.+)$/);
  const item = path => {
    if (hub) {
      return el("a", {href: `https://huggingface.co/${hub[1]}/blob/${hub[2]}/${filePath(path)}`,
        rel: "noopener noreferrer", target: "_blank"}, path);
    }
    if (!local) return path;
    const link = el("a", {href: `/v1/jobs/${jobId}/artifacts/${filePath(path)}`, "data-path": path}, path);
    link.addEventListener("click", async event => {
      event.preventDefault();
      state.textContent = `downloading ${path}…`;
      try { await download(jobId, path); state.textContent = ""; }
      catch (error) { state.textContent = `${path}: ${error.message}`; }
    });
    return link;
  };
  return el("details", {id: "files"}, el("summary", {}, `${(art.files || []).length} files`),
    local ? el("p", {class: "muted"}, "A click fetches the file with this tab's key and hands it to the browser "
      + "whole; for a large checkpoint, ", el("code", {}, `squeeze download ${jobId} FOLDER`),
      " streams every file and checks its sha256.") : "",
    state, el("ul", {class: "ids"}, (art.files || []).map(f => el("li", {}, item(f)))));
}

function artifactLink(uri) {
  const hub = uri.match(/^hf:\/\/([^@]+)/);
  return hub ? el("a", {href: `https://huggingface.co/${hub[1]}`, rel: "noopener noreferrer", target: "_blank"}, uri)
    : el("code", {}, uri);
}

export function servingSection(job) {
  const art = job.artifacts || {};
  return el("section", {id: "artifacts"},
    el("h2", {}, "Artifact and serving"),
    el("p", {}, "Published to ", art.uri ? artifactLink(art.uri) : "–",
      art.adapter ? ` (PEFT adapter in ${art.adapter}/)` : ""),
    art.serving ? servingTable(art.serving)
      : el("p", {class: "muted"}, "This job finished before engines were recorded on the job: "
        + "squeeze.json's “serving” table in the artifact lists them."),
    el("ul", {class: "notes", id: "notes"}, (art.notes || []).map(n => el("li", {}, n))),
    fileList(job.id, art));
}
