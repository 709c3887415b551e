// Submit a job: a form for the common fields, or a whole spec as YAML or JSON. The API's 422
// names each bad field (loc "train.epochs"); the message is shown at that field.

import { api, ApiError } from "../api.js";
import { h, problemBox } from "../dom.js";
import { load as loadYaml } from "../../vendor/js-yaml/js-yaml.esm.min.mjs";

// [loc, label, type, default]; type "number" fields are sent as numbers, empty ones omitted
const FIELDS = [
  ["data.uri", "dataset URI", "text", "builtin:digits"],
  ["data.max_samples", "max samples", "number", ""],
  ["data.loader_workers", "data-loader processes per worker", "number", ""],
  ["train.epochs", "epochs", "number", "1"],
  ["train.global_batch_size", "global batch size", "number", "32"],
  ["train.base_lr", "base lr (per 256 images)", "number", ""],
  ["mim.mask_ratio", "mask ratio (pretrain)", "number", ""],
  ["finetune.init_from", "initial weights (finetune: job:<id> or a URI)", "text", ""],
  ["resources.num_workers", "workers", "number", "1"],
  ["resources.cpus_per_worker", "CPUs per worker", "number", ""],
  ["resources.gpus_per_worker", "GPUs per worker", "number", ""],
  ["checkpoint.keep_last", "checkpoints kept", "number", ""],
];

function setPath(obj, loc, value) {
  const parts = loc.split(".");
  let node = obj;
  for (const p of parts.slice(0, -1)) node = node[p] ??= {};
  node[parts.at(-1)] = value;
}

export async function submitPage(main, { signal }) {
  const models = await api("/v1/models", { signal });
  const errorsAt = new Map(); // loc -> error element
  const field = (loc, label, control) => {
    const err = h("span", { class: "field-error", dataset: { errorFor: loc }, role: "alert" });
    errorsAt.set(loc, err);
    return h("div", { class: "field", dataset: { loc } }, h("label", { for: `spec-${loc}` }, label), control, err);
  };
  const kind = h("select", { id: "spec-kind", name: "kind" },
    h("option", { value: "pretrain" }, "pretrain"), h("option", { value: "finetune" }, "finetune"));
  const model = h("select", { id: "spec-model", name: "model" },
    models.items.map((m) => h("option", { value: m.name }, m.name)));
  const inputs = FIELDS.map(([loc, label, type, value]) => {
    const input = h("input", { id: `spec-${loc}`, name: loc, type: "text", value, inputmode: type === "number" ? "decimal" : null, dataset: { type } });
    return [loc, input, field(loc, label, input)];
  });
  const form = h("form", { id: "spec-form", class: "card", novalidate: true },
    field("kind", "kind", kind), field("model", "model", model), inputs.map(([, , el]) => el));
  const text = h("textarea", { id: "spec-text", rows: 18, cols: 80, spellcheck: "false",
    placeholder: "kind: pretrain\nmodel: swin_micro_patch2_window4_64\ndata: {uri: 'builtin:digits'}\ntrain: {epochs: 1}" });
  const textErrors = h("ul", { class: "field-error", id: "text-errors" });
  const textPane = h("div", { class: "card", hidden: true }, h("label", { for: "spec-text" }, "Spec as YAML or JSON"), text, textErrors);
  const general = h("div", { id: "submit-errors" });
  const mode = h("select", { id: "spec-mode" }, h("option", { value: "form" }, "form"), h("option", { value: "text" }, "YAML / JSON"));
  mode.addEventListener("change", () => {
    form.hidden = mode.value !== "form";
    textPane.hidden = mode.value === "form";
  });
  const submit = h("button", { type: "button", id: "submit" }, "Submit");
  main.append(h("h1", {}, "Submit a job"), h("p", {}, h("label", { for: "spec-mode" }, "Write the spec as a "), mode),
    form, textPane, general, submit);

  function fromForm() {
    const spec = { kind: kind.value, model: model.value };
    for (const [loc, input] of inputs) {
      const raw = input.value.trim();
      if (!raw) continue;
      const num = Number(raw);
      setPath(spec, loc, input.dataset.type === "number" && raw !== "" && !Number.isNaN(num) ? num : raw);
    }
    if (spec.kind !== "pretrain") delete spec.mim;
    if (spec.kind !== "finetune") delete spec.finetune;
    return spec;
  }

  function clearErrors() {
    errorsAt.forEach((el) => { el.textContent = ""; });
    textErrors.replaceChildren();
    general.replaceChildren();
  }

  function showErrors(err) {
    const errors = err.problem?.errors || [];
    const unplaced = [];
    for (const e of errors) {
      const at = mode.value === "form" && bestField(e.loc);
      if (at) at.textContent = at.textContent ? `${at.textContent}; ${e.msg}` : e.msg;
      else unplaced.push(e);
    }
    const list = mode.value === "form" ? general : textErrors;
    if (!errors.length) general.append(problemBox(err));
    if (unplaced.length && list === general) general.append(problemBox(err));
    if (list === textErrors) textErrors.replaceChildren(...unplaced.map((e) => h("li", {}, h("code", {}, e.loc), `: ${e.msg}`)));
  }

  function bestField(loc) {
    for (let parts = String(loc).split("."); parts.length; parts.pop()) {
      const el = errorsAt.get(parts.join("."));
      if (el) return el;
    }
    return null;
  }

  submit.addEventListener("click", async () => {
    clearErrors();
    let spec;
    try {
      spec = mode.value === "form" ? fromForm() : loadYaml(text.value);
    } catch (err) {
      textErrors.append(h("li", {}, `not YAML or JSON: ${err.message}`));
      return;
    }
    submit.disabled = true;
    try {
      const job = await api("/v1/jobs", { method: "POST", body: spec, signal });
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (err) {
      if (err instanceof ApiError) showErrors(err); else general.append(problemBox(err));
    } finally { submit.disabled = false; }
  });
}
