// Entry point: the API key prompt, the queue/workers panel, and the view for the current path.
import {api, apiKey, onAuthProblem, poll} from "./api.js";
import {compareView} from "./compare.js";
import {submitView} from "./form.js";
import {jobView} from "./job.js";
import {listView} from "./list.js";

const view = document.getElementById("view");
let stopView = () => {};

function route() {
  stopView();
  view.replaceChildren();
  const path = location.pathname;
  const job = path.match(/^\/jobs\/([0-9a-fA-F-]{32,36})$/);
  if (job) stopView = jobView(view, job[1]);
  else if (path === "/submit") stopView = submitView(view, new URLSearchParams(location.search).get("from"));
  else if (path === "/compare") stopView = compareView(view, new URLSearchParams(location.search).get("model"));
  else stopView = listView(view);
}

// Links inside the app change the view without a reload; each view still has its own URL. A link whose
// own handler took the click (an artifact file's download) is left alone.
document.addEventListener("click", event => {
  const link = event.target.closest("a[href^='/']");
  if (!link || event.defaultPrevented || event.ctrlKey || event.metaKey || event.shiftKey || link.getAttribute("href").startsWith("/docs")) return;
  event.preventDefault();
  history.pushState(null, "", link.getAttribute("href"));
  route();
});
window.addEventListener("popstate", route);

onAuthProblem(unauthorized => {
  document.getElementById("authstate").textContent =
    unauthorized ? "this server needs a valid API key" : (apiKey.get() ? "key in use" : "");
});
document.getElementById("keyform").addEventListener("submit", event => {
  event.preventDefault();
  const input = document.getElementById("key");
  if (input.value.trim()) apiKey.set(input.value.trim());
  input.value = "";
  route();
  stats.now();
});
document.getElementById("forget").addEventListener("click", () => { apiKey.forget(); route(); stats.now(); });

let lastStats = "";
const stats = poll(async () => {
  const s = await api("/v1/stats");
  document.getElementById("queued").textContent = s.queued;
  document.getElementById("running").textContent = s.running;
  document.getElementById("workers").textContent = s.workers_recent.length;
  document.getElementById("window").textContent = Math.round(s.workers_window_seconds / 60);
  document.getElementById("workernames").textContent = s.workers_recent.join(", ");
  const changed = JSON.stringify(s) !== lastStats;
  lastStats = JSON.stringify(s);
  return changed;
}, {minMs: 2000, maxMs: 15000});

route();
