// A job's webhook deliveries (GET /v1/jobs/{id}/webhooks), one row per attempt. Deliveries are queued
// when the job ends, so the list is fetched from then on, until no delivery is pending.
import {api, el, poll} from "./api.js";

function outcome(attempt) {
  return attempt.status_code !== null ? `HTTP ${attempt.status_code}` : attempt.error || "no answer";
}

function rows(delivery) {
  const time = iso => new Date(iso).toLocaleString();
  if (!delivery.attempts.length) {
    return [el("tr", {"data-delivery": delivery.id}, el("td", {}, delivery.event), el("td", {}, delivery.state),
      el("td", {class: "num"}, "–"), el("td", {}, "not sent yet"),
      el("td", {}, delivery.next_attempt_at ? `due ${time(delivery.next_attempt_at)}` : "–"))];
  }
  return delivery.attempts.map(a => el("tr", {"data-delivery": delivery.id},
    el("td", {}, delivery.event), el("td", {}, delivery.state), el("td", {class: "num"}, a.attempt),
    el("td", {}, outcome(a)), el("td", {}, time(a.at))));
}

// The receiver's host only: the URL's path and query often hold a token.
function host(url) {
  try { return new URL(url).host; } catch { return "the webhook URL"; }
}

export function deliveriesView(jobId, url) {
  const message = el("p", {class: "muted"}, `POSTed to ${host(url)} when the job ends.`);
  const tbody = el("tbody");
  const table = el("div", {class: "scroll", hidden: true}, el("table", {id: "deliveries"},
    el("thead", {}, el("tr", {}, el("th", {}, "event"), el("th", {}, "delivery"), el("th", {class: "num"}, "attempt"),
      el("th", {}, "answer"), el("th", {}, "time"))), tbody));
  const node = el("section", {id: "webhooks"}, el("h2", {}, "Webhook deliveries"), message, table);
  let poller = null, last = "";

  async function step() {
    const {items} = await api(`/v1/jobs/${jobId}/webhooks`);
    const shown = JSON.stringify(items);
    const changed = shown !== last;
    if (changed && items.length) {
      tbody.replaceChildren(...items.flatMap(rows));
      table.hidden = false;
      message.textContent = `POSTed to ${host(url)}.`;
    }
    last = shown;
    if (items.length && items.every(d => d.state !== "pending")) return "stop";
    return changed;
  }

  return {
    node,
    jobEnded() { poller ??= poll(step, {minMs: 700, maxMs: 8000}); },
    stop() { poller?.stop(); },
  };
}
