// Charts drawn as inline SVG: per-module error before/after compensation, and perplexity vs size.

const NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function niceTicks(lo, hi, count = 5) {
  const step = (hi - lo) / count || 1;
  const magnitude = 10 ** Math.floor(Math.log10(step));
  const nice = [1, 2, 5, 10].map(m => m * magnitude).find(s => s >= step);
  const ticks = [];
  for (let t = Math.ceil(lo / nice) * nice; t <= hi + nice * 1e-9; t += nice) ticks.push(+t.toPrecision(12));
  return ticks;
}

function frame(width, height, pad, xTicks, yTicks, x, y, xLabel, yLabel, label) {
  const root = svg("svg", {viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img", "aria-label": label});
  for (const t of yTicks) {
    root.append(svg("line", {class: "grid", x1: pad.left, x2: width - pad.right, y1: y(t), y2: y(t)}));
    root.append(svg("text", {x: pad.left - 6, y: y(t) + 4, "text-anchor": "end"}, String(t)));
  }
  for (const [value, text] of xTicks) {
    root.append(svg("text", {x: x(value), y: height - pad.bottom + 16, "text-anchor": "middle"}, text));
  }
  root.append(svg("line", {class: "axis", x1: pad.left, x2: width - pad.right, y1: height - pad.bottom, y2: height - pad.bottom}));
  root.append(svg("line", {class: "axis", x1: pad.left, x2: pad.left, y1: pad.top, y2: height - pad.bottom}));
  root.append(svg("text", {x: (pad.left + width - pad.right) / 2, y: height - 6, "text-anchor": "middle"}, xLabel));
  root.append(svg("text", {x: 12, y: pad.top - 8}, yLabel));
  return root;
}

// modules: [{name, layer, error_before, error_after}] in model order. Two lines over the modules,
// x labelled by decoder layer.
export function moduleErrorChart(modules) {
  const width = 760, height = 300, pad = {left: 52, right: 16, top: 28, bottom: 42};
  const values = modules.flatMap(m => [m.error_before, m.error_after]).filter(v => v !== null);
  const top = Math.max(...values, 1e-6) * 1.08;
  const x = i => pad.left + (modules.length === 1 ? 0.5 : i / (modules.length - 1)) * (width - pad.left - pad.right);
  const y = v => height - pad.bottom - (v / top) * (height - pad.top - pad.bottom);
  const layerStarts = [];
  modules.forEach((m, i) => { if (i === 0 || m.layer !== modules[i - 1].layer) layerStarts.push([i, `L${m.layer}`]); });
  const every = Math.ceil(layerStarts.length / 16);
  const root = frame(width, height, pad, layerStarts.filter((_, k) => k % every === 0), niceTicks(0, top), x, y,
    "module, in model order (L = decoder layer)", "relative output error ‖(W−W′)X‖ / ‖WX‖",
    "relative output error per module, before and after compensation");
  for (const [series, cls] of [["error_before", "before"], ["error_after", "after"]]) {
    const points = modules.map((m, i) => [i, m[series]]).filter(([, v]) => v !== null);
    if (!points.length) continue;
    root.append(svg("polyline", {class: cls, fill: "none", "stroke-width": 1.5,
      points: points.map(([i, v]) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" ")}));
    for (const [i, v] of points) {
      const dot = svg("circle", {class: `${cls} point`, cx: x(i).toFixed(1), cy: y(v).toFixed(1), r: 2.5});
      dot.append(svg("title", {}, `${modules[i].name}: ${v}`));
      root.append(dot);
    }
  }
  return root;
}

// The points no other point dominates: at most the weight bits, at most the adapter bytes and at most
// the perplexity, and less in one of them.
export function paretoFront(points) {
  const noWorse = (q, p) => q.size <= p.size && q.adapter <= p.adapter && q.ppl <= p.ppl;
  const better = (q, p) => q.size < p.size || q.adapter < p.adapter || q.ppl < p.ppl;
  return points.filter(p => !points.some(q => q !== p && noWorse(q, p) && better(q, p)));
}

// points: [{size, adapter, ppl, label, id}]; the front is joined by a line and its points drawn in green.
export function paretoChart(points, xLabel) {
  const width = 760, height = 340, pad = {left: 60, right: 20, top: 28, bottom: 44};
  const sizes = points.map(p => p.size), ppls = points.map(p => p.ppl);
  const xlo = Math.min(...sizes), xhi = Math.max(...sizes), ylo = Math.min(...ppls), yhi = Math.max(...ppls);
  const xspan = xhi - xlo || Math.max(1, xhi * 0.2), yspan = yhi - ylo || Math.max(1, yhi * 0.1);
  const x0 = xlo - xspan * 0.1, x1 = xhi + xspan * 0.1, y0 = Math.max(0, ylo - yspan * 0.15), y1 = yhi + yspan * 0.15;
  const x = v => pad.left + (v - x0) / (x1 - x0) * (width - pad.left - pad.right);
  const y = v => height - pad.bottom - (v - y0) / (y1 - y0) * (height - pad.top - pad.bottom);
  const root = frame(width, height, pad, niceTicks(x0, x1).filter(t => t >= x0 && t <= x1).map(t => [t, String(t)]),
    niceTicks(y0, y1).filter(t => t >= y0 && t <= y1), x, y, xLabel, "perplexity after (lower is better)",
    "perplexity against size, with the Pareto front");
  const front = paretoFront(points).sort((a, b) => a.size - b.size || a.adapter - b.adapter);
  if (front.length > 1) {
    root.append(svg("polyline", {class: "front", points: front.map(p => `${x(p.size).toFixed(1)},${y(p.ppl).toFixed(1)}`).join(" ")}));
  }
  for (const p of points) {
    const dot = svg("circle", {class: front.includes(p) ? "optimal" : "dominated", cx: x(p.size).toFixed(1),
      cy: y(p.ppl).toFixed(1), r: 5, "data-job": p.id});
    dot.append(svg("title", {}, `${p.label}: perplexity ${p.ppl.toFixed(3)}, size ${p.size}`));
    root.append(dot);
  }
  return root;
}
