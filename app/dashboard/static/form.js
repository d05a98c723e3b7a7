// The submit form: every job spec field, defaults and help read from the API's own schema
// (/openapi.json, i.e. app/jobs/spec.py), the API's 422 messages shown next to the fields.
import {api, el, navigate} from "./api.js";

// [section, schema name, optional section?, fields]; a field is [path inside the section, kind].
const SECTIONS = [
  ["model", "ModelRef", false, [["id", "text"], ["revision", "text"]]],
  ["quantization", "Quantization", true, [["method", "enum"], ["bits", "enum"], ["group_size", "number"],
    ["symmetric", "bool"], ["damp", "number"], ["act_order", "tristate"]]],
  ["sparsity", "Sparsity", true, [["method", "enum"], ["ratio", "number"], ["pattern", "text"]]],
  ["compensation", "Compensation", true, [["method", "enum"], ["rank", "number"], ["rank_budget.params", "number"],
    ["rank_budget.fraction", "number"], ["rank_budget.criterion", "enum"], ["rank_budget.min_rank", "number"],
    ["adapter_bits", "enum"], ["damp", "number"], ["sink_tokens", "number"], ["refine", "number"]]],
  ["target", "Target", true, [["bits_per_weight", "number"], ["engine", "enum"]]],
  ["calibration", "Calibration", false, [["dataset", "text"], ["split", "text"], ["text_field", "text"],
    ["num_samples", "number"], ["seq_len", "number"], ["seed", "number"]]],
  ["evaluation", "Evaluation", false, [["dataset", "text"], ["split", "text"], ["text_field", "text"],
    ["num_windows", "number"], ["seq_len", "number"]]],
  ["destination", "Destination", false, [["uri", "text"], ["private", "bool"], ["create_repo", "bool"]]],
];
const ON_BY_DEFAULT = new Set(["quantization"]);  // the spec needs quantization or sparsity
// What a size target chooses per Linear: emptied while target is ticked with a bits_per_weight (the API
// refuses them next to it), their defaults back otherwise.
const CHOSEN_BY_TARGET = ["quantization.bits", "quantization.group_size"];
// The empty choice of a select whose field may be left out although it has a default.
const EMPTY_LABELS = {"quantization.bits": "chosen by target.bits_per_weight"};

let schemaCache;
async function schemas() {
  schemaCache ??= fetch("/openapi.json").then(r => r.json()).then(doc => doc.components.schemas);
  return schemaCache;
}

function property(all, schemaName, path) {
  let schema = all[schemaName] || all[`${schemaName}-Input`];
  const parts = path.split(".");
  for (const part of parts.slice(0, -1)) {
    const ref = (schema.properties[part].anyOf || []).find(s => s.$ref) || schema.properties[part];
    schema = all[ref.$ref.split("/").pop()];
  }
  const prop = schema.properties[parts.at(-1)];
  const options = prop.enum || (prop.anyOf || []).find(s => s.enum)?.enum;
  const nullable = (prop.anyOf || []).some(s => s.type === "null");
  return {default: prop.default, description: prop.description || "", enum: options, nullable};
}

function input(name, kind, prop) {
  const id = `f-${name.replaceAll(".", "-")}`;
  if (kind === "bool") return el("input", {id, type: "checkbox", name, checked: prop.default === true});
  if (kind === "tristate" || kind === "enum") {
    const values = kind === "tristate" ? ["", "true", "false"]
      : [...(prop.nullable || prop.default === null || prop.default === undefined ? [""] : []), ...prop.enum.map(String)];
    const empty = kind === "tristate" ? "default (see help)" : EMPTY_LABELS[name] || "none";
    const select = el("select", {id, name}, values.map(v => el("option", {value: v}, v === "" ? empty : v)));
    if (kind === "enum" && prop.default !== null && prop.default !== undefined) select.value = String(prop.default);
    return select;
  }
  const value = prop.default === null || prop.default === undefined ? "" : prop.default;
  // Numbers are text inputs: whatever is typed reaches the API, whose 422 message then explains it.
  return el("input", {id, name, type: "text", inputmode: kind === "number" ? "decimal" : null, value, autocomplete: "off"});
}

function readValue(field, kind) {
  if (kind === "bool") return field.checked;
  const raw = field.value.trim();
  if (raw === "") return undefined;
  if (kind === "tristate") return raw === "true";
  if (kind === "number" || (kind === "enum" && /^\d+$/.test(raw))) return Number.isNaN(Number(raw)) ? raw : Number(raw);
  return raw;
}

function setPath(target, path, value) {
  const parts = path.split(".");
  let node = target;
  for (const part of parts.slice(0, -1)) node = node[part] ??= {};
  node[parts.at(-1)] = value;
}

function getPath(source, path) {
  return path.split(".").reduce((node, part) => (node === null || node === undefined ? undefined : node[part]), source);
}

export function submitView(root, fromJob) {
  const form = el("form", {class: "spec", id: "spec-form", novalidate: true});
  const formProblem = el("p", {class: "problem error", id: "form-problem"});
  root.append(el("h1", {}, fromJob ? "Submit again with changes" : "New compression job"),
    el("p", {class: "muted"}, "Defaults come from the API's job spec; leave a field empty to use the server's default."),
    form);
  const fields = new Map();  // "section.path" -> [element, kind, wrapper, default]
  const toggles = new Map();
  let stopped = false;

  function field(all, schemaName, name, path, kind) {
    const prop = property(all, schemaName, path);
    const element = input(name, kind, prop);
    const wide = name === "model.id" || name === "webhook_url" || name.endsWith(".dataset");
    const wrapper = el("div", {class: `field${wide ? " wide" : ""}`},
      el("label", {for: element.id}, path), element,
      prop.description ? el("div", {class: "help"}, prop.description) : "",
      el("div", {class: "problem", "data-problem-for": name}));
    if (name === "calibration.dataset") wrapper.append(uploadControl(element));
    fields.set(name, [element, kind, wrapper, prop.default]);
    return wrapper;
  }

  // A size target (target ticked, bits_per_weight given) leaves the bits and group size to the worker.
  function syncChosenByTarget() {
    const sized = toggles.get("target").checked && fields.get("target.bits_per_weight")[0].value.trim() !== "";
    for (const name of CHOSEN_BY_TARGET) {
      const [element, , , fallback] = fields.get(name);
      if (sized) element.value = "";
      else if (element.value === "") element.value = String(fallback);
    }
  }

  (async () => {
    const all = await schemas();
    for (const [section, schemaName, optional, list] of SECTIONS) {
      const box = el("div", {class: "fields"});
      const legend = el("legend", {}, section);
      const sectionProblem = el("div", {class: "problem error", "data-problem-for": section});
      if (optional) {
        const toggle = el("input", {type: "checkbox", id: `use-${section}`, checked: ON_BY_DEFAULT.has(section)});
        toggles.set(section, toggle);
        legend.replaceChildren(el("label", {}, toggle, ` ${section}`));
        const sync = () => { box.hidden = !toggle.checked; };
        toggle.addEventListener("change", sync);
        sync();
      }
      box.append(...list.map(([path, kind]) => field(all, schemaName, `${section}.${path}`, path, kind)));
      form.append(el("fieldset", {"data-section": section}, legend, sectionProblem, box));
    }
    toggles.get("target").addEventListener("change", syncChosenByTarget);
    fields.get("target.bits_per_weight")[0].addEventListener("input", syncChosenByTarget);
    const token = el("input", {id: "f-hf_token", type: "password", name: "hf_token", autocomplete: "off"});
    form.append(
      el("fieldset", {}, el("legend", {}, "notification (optional)"),
        el("div", {class: "fields"}, field(all, "JobSpec", "webhook_url", "webhook_url", "text"))),
      el("fieldset", {}, el("legend", {}, "Hugging Face token (optional)"),
        el("div", {class: "field"}, token, el("div", {class: "help"}, property(all, "JobSpec", "hf_token").description),
          el("div", {class: "problem", "data-problem-for": "hf_token"}))),
      formProblem, el("div", {class: "actions"}, el("button", {id: "submit"}, "Submit job")));
    fields.set("hf_token", [token, "text", null, null]);
    if (fromJob && !stopped) prefill(await api(`/v1/jobs/${fromJob}`));
  })().catch(error => { formProblem.textContent = `Could not build the form: ${error.message}`; });

  function prefill(job) {
    for (const [section, , optional] of SECTIONS) {
      if (optional) toggles.get(section).checked = job.spec[section] !== null && job.spec[section] !== undefined;
      toggles.get(section)?.dispatchEvent(new Event("change"));
    }
    for (const [name, [field, kind, , fallback]] of fields) {
      const value = getPath(job.spec, name);
      const text = value === null || value === undefined ? "" : String(value);
      if (kind === "bool") field.checked = value === true;
      // A select without an empty choice (rank_budget.criterion of a job with no budget) keeps its default.
      else if (field.tagName === "SELECT" && ![...field.options].some(option => option.value === text)) {
        field.value = String(fallback ?? "");
      } else field.value = text;
    }
  }

  function spec() {
    const body = {};
    for (const [name, [field, kind]] of fields) {
      const section = name.split(".")[0];
      if (toggles.has(section) && !toggles.get(section).checked) continue;
      const value = readValue(field, kind);
      if (value !== undefined) setPath(body, name, value);
    }
    for (const [section, toggle] of toggles) if (toggle.checked) body[section] ??= {};
    // criterion and min_rank have defaults; a budget is only asked for with params or a fraction.
    const budget = body.compensation && body.compensation.rank_budget;
    if (budget && budget.params === undefined && budget.fraction === undefined) delete body.compensation.rank_budget;
    return body;
  }

  function showProblems(error) {
    form.querySelectorAll("[data-problem-for]").forEach(node => { node.textContent = ""; });
    form.querySelectorAll(".invalid").forEach(node => node.classList.remove("invalid"));
    formProblem.textContent = "";
    const fieldsAtFault = error.body.fields || [];
    // Several problems come joined by "; "; one may hold "; " itself.
    const detail = error.body.detail || error.message;
    const problems = fieldsAtFault.length > 1 ? detail.split("; ") : [detail];
    fieldsAtFault.forEach((loc, i) => {
      const text = problems[i] || error.message;
      // The nearest place on the form: the field, else its section, else the top.
      let target = null;
      for (let path = loc; path && !target; path = path.split(".").slice(0, -1).join(".")) {
        target = form.querySelector(`[data-problem-for="${CSS.escape(path)}"]`);
      }
      (target || formProblem).textContent = text;
      fields.get(loc)?.[2]?.classList.add("invalid");
    });
    if (!fieldsAtFault.length) formProblem.textContent = error.message;
    (form.querySelector(".invalid") || formProblem).scrollIntoView({block: "center"});
  }

  form.addEventListener("submit", async event => {
    event.preventDefault();
    const button = form.querySelector("#submit");
    button.disabled = true;
    try {
      const job = await api("/v1/jobs", {method: "POST", json: spec()});
      navigate(`/jobs/${job.id}`);
    } catch (error) {
      if (error.status === 422) showProblems(error);
      else formProblem.textContent = error.message;
    } finally {
      button.disabled = false;
    }
  });
  return () => { stopped = true; };
}

function uploadControl(datasetField) {
  const file = el("input", {type: "file", id: "calibration-file", accept: ".txt,.jsonl,.parquet"});
  const state = el("span", {class: "help", id: "upload-state"});
  file.addEventListener("change", async () => {
    if (!file.files.length) return;
    const data = new FormData();
    data.append("file", file.files[0]);
    state.textContent = "uploading…";
    try {
      const upload = await api("/v1/uploads", {method: "POST", form: data});
      datasetField.value = upload.dataset;
      state.textContent = `uploaded ${upload.bytes} bytes as ${upload.dataset} (kept until ${new Date(upload.expires_at).toLocaleString()})`;
    } catch (error) {
      state.textContent = `upload failed: ${error.message}`;
    }
  });
  return el("label", {class: "help"}, "or upload a calibration file (.txt, .jsonl, .parquet): ", file, " ", state);
}
