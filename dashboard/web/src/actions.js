// What a person can do from the pages: buttons that POST an action and show its outcome, a
// confirmation with a reason (promote, roll back), and the "Try a model" panel of the models page.
// For tests: an outcome box carries data-state (ok / error) and the try table data-rows.
import { postJSON } from "./api.js";
import { clear, fmtNumber, h, put, table } from "./dom.js";

/** A box where actions report what happened (kept across a page's refreshes). */
export function outcomeBox() {
  return h("div", { class: "outcome", role: "status", "aria-live": "polite" });
}

export function showOutcome(box, ok, text) {
  box.dataset.state = ok ? "ok" : "error";
  clear(box, h("div", { class: ok ? "notice" : "error" }, text));
}

/**
 * Run an action: POST `body` to `path`, then show `done(answer)` (a sentence) or the error in `box`,
 * and call `after()` (a refresh) either way. Returns whether it succeeded.
 */
export async function act(box, path, body, done, after) {
  try {
    const answer = await postJSON(path, body);
    showOutcome(box, true, done(answer));
    return true;
  } catch (error) {
    showOutcome(box, false, String(error.message || error));
    return false;
  } finally {
    if (after) after();
  }
}

/** a button that runs `run()` once per click, disabled while it runs */
export function actionButton(label, run, attrs = {}) {
  const button = h("button", {
    ...attrs,
    class: `action ${attrs.class || ""}`.trim(),
    onclick: async () => {
      button.disabled = true;
      try { await run(); } finally { button.disabled = false; }
    },
  }, label);
  return button;
}

/**
 * A confirmation asked in the page (no browser dialog): `question`, an optional reason field, Confirm
 * and Cancel. `onConfirm(reason)` runs the action; `onClose()` is called when it is gone.
 */
export function confirmPanel(question, { reason = true, confirmLabel = "Confirm", onConfirm, onClose }) {
  const field = reason ? h("input", { type: "text", class: "reason grow", placeholder: "reason (optional, recorded with the decision)", maxlength: "2000", "aria-label": "reason" }) : null;
  const panel = h("div", { class: "confirm card" });
  const close = () => { panel.remove(); if (onClose) onClose(); };
  put(panel,
    h("div", { class: "confirm-question" }, question),
    h("div", { class: "toolbar" }, field,
      actionButton(confirmLabel, async () => { await onConfirm(field ? field.value.trim() : ""); close(); }, { class: "primary confirm-yes" }),
      h("button", { class: "confirm-no", onclick: close }, "Cancel")));
  setTimeout(() => (field || panel.querySelector("button"))?.focus(), 0);
  return panel;
}

// -- try a model -------------------------------------------------------------------------------------

function predictionText(answer, i) {
  const row = answer.predictions[i];
  if (answer.classes) return { main: `class ${answer.classes[i]}`, detail: `p=${fmtNumber(Math.max(...row), 3)}`, value: answer.classes[i] };
  const flat = Array.isArray(row) ? row.flat(Infinity) : [row];
  return { main: flat.slice(0, 4).map((v) => fmtNumber(v, 4)).join(", ") + (flat.length > 4 ? " …" : ""), detail: "", value: JSON.stringify(row) };
}

/** The answer of POST /api/try as a table: one row per input, one column per version. */
export function tryTable(answer) {
  const versions = answer.versions;
  const reference = versions.find((v) => v.production) || versions[0];
  const count = reference.predictions.length;
  const samples = answer.samples;
  const columns = ["#", ...(samples ? ["sample", "label"] : []),
    ...versions.map((v) => `v${v.version}${v.production ? " (production)" : ""}`)];
  const rows = Array.from({ length: count }, (_, i) => {
    const label = samples ? samples[i].label : null;
    const base = predictionText(reference, i).value;
    return h("tr", { class: "try-row", dataset: { index: String(i) } },
      h("td", { class: "num" }, String(i + 1)),
      samples ? [h("td", { class: "run" }, samples[i].id), h("td", { class: "num" }, label === null ? "–" : JSON.stringify(label))] : null,
      versions.map((v) => {
        const shown = predictionText(v, i);
        const classes = ["prediction"];
        if (v !== reference && shown.value !== base) classes.push("differs");
        if (samples && label !== null && v.classes) classes.push(v.classes[i] === label ? "right" : "wrong");
        return h("td", { class: classes.join(" "), dataset: { version: String(v.version) } },
          shown.main, shown.detail ? h("span", { class: "small muted" }, ` ${shown.detail}`) : null);
      }));
  });
  const summary = versions.map((v) => {
    const right = samples && v.classes ? samples.filter((s, i) => s.label !== null && v.classes[i] === s.label).length : null;
    return `v${v.version}${v.production ? " (production)" : ""}${right === null ? "" : `: ${right}/${count} right`}`;
  }).join(" · ");
  return h("div", { class: "try-result", dataset: { rows: String(count), versions: versions.map((v) => v.version).join(",") } },
    h("div", { class: "small muted" }, `${count} inputs · ${summary} · cells that differ from ${reference.production ? "production" : `v${reference.version}`} are marked`),
    table(columns, rows, { class: "try-table" }));
}

/**
 * The "Try a model" panel: choose a model, versions (production is always compared), and a cohort
 * (a saved one, or the policy's validation data) with a sample count, or paste a JSON array.
 * `update(models, cohorts)` refreshes the choices without losing what was chosen.
 */
export function tryPanel() {
  const modelSelect = h("select", { "aria-label": "model", class: "try-model" });
  const versionsBox = h("div", { class: "try-versions" });
  const source = h("select", { "aria-label": "input", class: "try-source" });
  const count = h("input", { type: "number", min: "1", max: "64", value: "8", class: "try-count", "aria-label": "samples" });
  const countLabel = h("label", {}, count, " samples");
  const pasted = h("textarea", { class: "try-json", rows: "4", placeholder: "[[...], [...]]  a JSON array of instances (at most 64), each of the model's input shape", "aria-label": "instances" });
  const box = outcomeBox();
  const result = h("div");
  let models = [];
  let cohorts = [];
  const chosenVersions = new Map();  // model -> Set of versions ticked

  const model = () => models.find((m) => m.name === modelSelect.value);
  const renderVersions = () => {
    const current = model();
    if (!current) { clear(versionsBox, h("span", { class: "muted" }, "no model yet")); return; }
    const ticked = chosenVersions.get(current.name) || new Set();
    chosenVersions.set(current.name, ticked);
    clear(versionsBox, h("span", { class: "muted small" }, "versions: "), current.versions.slice(0, 30).map((v) => h("label", { class: "chip" },
      h("input", {
        type: "checkbox", checked: v.production || ticked.has(v.version), disabled: v.production, dataset: { version: String(v.version) },
        onchange: (event) => { if (event.target.checked) ticked.add(v.version); else ticked.delete(v.version); },
      }), ` v${v.version}${v.production ? " (production)" : ""}`)));
  };
  const renderSources = () => {
    const before = source.value;
    const current = model();
    const options = [
      ...(current?.policy ? [h("option", { value: "policy" }, `validation data of policy ${current.name}`)] : []),
      ...cohorts.map((c) => h("option", { value: `cohort:${c.name}` }, `cohort ${c.name}`)),
      h("option", { value: "json" }, "paste a JSON array"),
    ];
    clear(source, options);
    if ([...source.options].some((o) => o.value === before)) source.value = before;
    renderSource();
  };
  const renderSource = () => {
    const json = source.value === "json";
    pasted.hidden = !json;
    countLabel.hidden = json;
  };
  modelSelect.addEventListener("change", () => { renderVersions(); renderSources(); });
  source.addEventListener("change", renderSource);

  const run = async () => {
    const current = model();
    if (!current) return;
    clear(result);  // an earlier answer must not pass for this one's
    const body = { model: current.name, versions: [...(chosenVersions.get(current.name) || [])].sort((a, b) => a - b) };
    if (source.value === "json") {
      try {
        body.instances = JSON.parse(pasted.value);
      } catch (error) {
        showOutcome(box, false, `the pasted text is not JSON: ${error.message}`);
        return;
      }
    } else {
      body.samples = Number(count.value) || 8;
      body.cohort = source.value === "policy"
        ? { filter: current.policy.validation.filter || {}, x: current.policy.validation.x || "x", y: current.policy.validation.y ?? "y" }
        : { name: source.value.slice("cohort:".length) };
    }
    await act(box, "/api/try", body, (answer) => {
      clear(result, tryTable(answer));
      return `predicted ${answer.versions[0].predictions.length} inputs with ${answer.versions.map((v) => `v${v.version}`).join(", ")} of ${answer.model}`;
    });
  };

  const element = h("div", { class: "card try" },
    h("h2", {}, "Try a model"),
    h("div", { class: "small muted" }, "predictions of production and of any other version, side by side, on samples of a cohort or on pasted instances"),
    h("div", { class: "toolbar" }, h("label", {}, "model ", modelSelect), versionsBox),
    h("div", { class: "toolbar" }, h("label", {}, "input ", source), countLabel,
      actionButton("Predict", run, { class: "primary try-run" })),
    pasted, box, result);

  return {
    element,
    update(nextModels, nextCohorts) {
      models = nextModels.filter((m) => m.versions.length);
      cohorts = nextCohorts;
      const before = modelSelect.value;
      clear(modelSelect, models.map((m) => h("option", { value: m.name }, m.name)));
      if (models.some((m) => m.name === before)) modelSelect.value = before;
      renderVersions();
      renderSources();
    },
  };
}
