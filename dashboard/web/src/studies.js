// The studies pages: #/studies (every study of the project) and #/study/<name> (one study whole:
// the best configuration so far, a parallel-coordinates chart of hyper-parameters → objective,
// every trial's validation curve, the trials table, ASHA's verdicts). A running study is polled
// every 2 s and the API answers with only the rows that changed since the version the page holds;
// brushing an axis of the chart filters the table and greys out the other curves. Built for
// thousands of trials: both charts are canvases and the table shows one page of rows at a time.
// For tests: the trials table's wrapper carries data-shown (trials matching the filters) and
// data-total; each row data-trial and data-status.
import { act, actionButton, outcomeBox } from "./actions.js";
import { every, getJSON } from "./api.js";
import { Chart } from "./charts.js";
import { badge, clear, fmtAgo, fmtNumber, fmtTime, h, put, table } from "./dom.js";
import { ParallelCoordinates, objectiveAxis, rampColour, valueText } from "./parallel.js";
import { runHref, studyHref } from "./routes.js";

const main = document.getElementById("main");
const PAGE_ROWS = 100;
const RUNNING_POLL_MS = 2000;
const ENDED_POLL_MS = 10000;
const GREY = "rgba(156, 163, 175, 0.35)";

/** the rows of an answer's table ({columns, rows}) as objects */
export function records(answer) {
  const { columns, rows } = answer;
  return rows.map((row) => Object.fromEntries(columns.map((column, i) => [column, row[i]])));
}

function searcherText(study) {
  const s = study.searcher;
  if (s.name !== "asha") return s.name;
  return `asha (${s.sampler} sampler, rungs at ${s.rungs.join(", ")} epochs of ${s.max_epochs}, η=${s.reduction_factor})`;
}

function objectiveText(objective) {
  return `${objective.metric} (${objective.direction === "max" ? "higher" : "lower"} is better)`;
}

/** why ASHA let a configuration go on or stopped it, from the verdict's numbers */
export function verdictText(decision, study) {
  if (!decision) return "";
  const { metric, direction } = study.objective;
  const stopped = decision.action === "stop";
  if (decision.value === null) return `${metric} was not reported as a number: stopped`;
  if (decision.cutoff === null) return `${metric} ${fmtNumber(decision.value)}: the first configuration at this rung continues`;
  const comparison = direction === "max" ? (stopped ? "<" : "≥") : (stopped ? ">" : "≤");
  return `${metric} ${fmtNumber(decision.value)} ${comparison} cut-off ${fmtNumber(decision.cutoff)} `
    + `(the best 1/${study.searcher.reduction_factor} of ${decision.compared_with} earlier): ${stopped ? "stopped" : "continues"}`;
}

function countsText(counts) {
  return ["active", "finished", "stopped", "failed", "cancelled"]
    .filter((status) => counts[status])
    .map((status) => `${counts[status]} ${status}`)
    .join(" · ") || "no trials yet";
}

// -- every study ------------------------------------------------------------------------------------

export function studiesPage() {
  const errors = h("div");
  const body = h("div");
  put(main, h("section", {}, errors, body));
  return every(3000, async () => {
    const { studies, now } = await getJSON("/api/studies");
    if (!studies.length) {
      clear(body, h("p", { class: "muted" }, "no studies yet: create one with `tensordb study create SPEC.json` or db.create_study(...)"));
      return;
    }
    clear(body, h("div", { class: "card" }, h("h2", {}, "studies"),
      table(["study", "status", "searcher", "objective", "trials", "configurations", "best", "created", "ended"],
        studies.map((s) => h("tr", { dataset: { study: s.name } },
          h("td", { class: "run" }, h("a", { href: studyHref(s.name), class: "study-link" }, s.name)),
          h("td", {}, badge(s.status, s.status)),
          h("td", { class: "small" }, searcherText(s)),
          h("td", { class: "small" }, objectiveText(s.objective)),
          h("td", { class: "small" }, `${s.trials} · ${countsText(s.counts)}`),
          h("td", { class: "num" }, `${s.configurations} of ${s.configurations_limit}`),
          h("td", { class: "num" }, s.best_objective === null ? "–" : `${fmtNumber(s.best_objective)} (#${s.best_configuration})`),
          h("td", { class: "small" }, fmtAgo(s.created_at, now)),
          h("td", { class: "small" }, s.finished_at ? fmtAgo(s.finished_at, now) : "–"))))));
  }, errors);
}

// -- one study ----------------------------------------------------------------------------------------

/** What the page holds of a study: the API's rows merged by key, answer after answer. */
export class StudyData {
  constructor() {
    this.version = null;
    this.head = null;
    this.trials = new Map();
    this.configurations = new Map();
    this.decisions = new Map();
    this.ordered = [];
    this.stops = new Map();            // configuration -> the verdict that stopped it
    this.hyperparameters = new Map();  // configuration -> its values (those of its trials)
  }

  /** merge an answer; returns whether any row changed */
  merge(answer) {
    const { trials, configurations, decisions, version, full, ...head } = answer;
    if (full) {
      this.trials.clear();
      this.configurations.clear();
      this.decisions.clear();
    }
    for (const trial of records(trials)) this.trials.set(trial.id, trial);
    for (const row of records(configurations)) this.configurations.set(row.configuration, row);
    for (const decision of records(decisions)) this.decisions.set(`${decision.configuration}:${decision.rung}`, decision);
    this.head = head;
    this.version = version;
    const changed = full || trials.rows.length > 0 || configurations.rows.length > 0 || decisions.rows.length > 0;
    if (changed) {
      this.ordered = [...this.trials.values()].sort((a, b) => a.configuration - b.configuration || (a.fold ?? 0) - (b.fold ?? 0));
      this.stops = new Map([...this.decisions.values()].filter((d) => d.action === "stop").map((d) => [d.configuration, d]));
      this.hyperparameters = new Map(this.ordered.map((trial) => [trial.configuration, trial.hyperparameters]));
    }
    return changed;
  }

  /** a configuration's place on the objective axis: its final objective, else where it stands */
  value(configuration) {
    const row = this.configurations.get(configuration);
    return row ? (row.objective ?? row.latest) : null;
  }

}

export function studyPage(params, name) {
  const data = new StudyData();
  const title = h("h1", { class: "run-title" }, name);
  const status = h("span");
  const outcome = outcomeBox();
  const summary = h("div", { class: "small muted" });
  const errors = h("div");
  const best = h("div", { class: "card best" });
  const brushNote = h("span", { class: "muted small" });
  const clearBrushes = h("button", { onclick: () => parallel.clearBrushes() }, "clear filters");
  const parallelBox = h("div", { class: "parallel" });
  const curvesBox = h("div", { class: "chart study-curves", dataset: { points: "0" } });
  const curvesNote = h("div", { class: "muted small" });
  const statusFilter = h("select", { "aria-label": "status" },
    ["all", "active", "finished", "stopped", "failed", "cancelled"].map((s) => h("option", { value: s }, s)));
  const sortBy = h("select", { "aria-label": "sort" },
    [["configuration", "by configuration"], ["objective", "best objective first"], ["newest", "newest first"]].map(([v, t]) => h("option", { value: v }, t)));
  const pager = h("span", { class: "pager" });
  const tableBox = h("div", { class: "trials", dataset: { shown: "0", total: "0" } });
  const verdicts = h("div");
  put(main, h("section", { class: "study" },
    h("div", { class: "toolbar" }, h("a", { href: "#/studies" }, "← studies")),
    h("div", { class: "study-title" }, title, status), summary, outcome, errors,
    h("div", { class: "study-top" },
      best,
      h("div", { class: "card grow" },
        h("div", { class: "toolbar" }, h("h2", {}, "hyper-parameters → objective"), brushNote, clearBrushes),
        h("div", { class: "small muted" }, "one line per configuration; drag along an axis to keep a range (filters the table and the curves), click an axis to clear it"),
        parallelBox)),
    h("div", { class: "card" }, h("h2", {}, "validation curves"), curvesBox, curvesNote),
    h("div", { class: "card" },
      h("div", { class: "toolbar" }, h("h2", {}, "trials"), statusFilter, sortBy, pager),
      tableBox),
    verdicts));

  let selected = null;      // configurations inside every brush (null: no chart yet)
  let highlighted = null;   // the configuration under the mouse in the table
  let page = 0;
  let curves = null;
  let curveShape = "";
  let seriesTrials = [];
  let tableFrame = 0;
  let lastFetch = 0;
  let stale = false;

  const parallel = new ParallelCoordinates(parallelBox, {
    id: "study",
    onBrush: (keys) => {
      selected = keys;
      page = 0;
      brushNote.textContent = parallel.brushes.size ? `${keys.size} of ${data.configurations.size} configurations kept` : "";
      clearBrushes.disabled = !parallel.brushes.size;
      scheduleTable();
      if (curves) curves.restyle();
    },
  });
  clearBrushes.disabled = true;

  const isSelected = (configuration) => selected === null || selected.has(configuration);
  const direction = () => data.head?.objective.direction || "max";
  let colours = new Map();  // configuration -> its colour on the objective's ramp (as in the chart)

  // -- header and best so far --
  const renderHead = () => {
    const study = data.head;
    clear(status, " ", badge(study.status, study.status), study.status === "running" ? [" ", actionButton("Stop study", () => act(outcome,
      "/api/studies/stop", { name }, (a) => `study ${a.study} ${a.status}: no new trials; its unfinished trials are cancelled`,
      () => { lastFetch = 0; }), { class: "study-stop" })] : null);
    summary.textContent = `${searcherText(study)} · objective ${objectiveText(study.objective)}`
      + `${study.folds ? ` · ${study.folds} folds` : ""} · ${study.trial_count} trials (${countsText(study.counts)})`
      + ` · ${data.configurations.size} of ${study.configurations_limit} configurations · up to ${study.max_concurrent} at once`
      + ` · created ${fmtTime(study.created_at)}${study.finished_at ? ` · ended ${fmtTime(study.finished_at)}` : ""}`;
    const b = study.best;
    clear(best, h("h2", {}, study.status === "finished" ? "best configuration" : "best so far"));
    if (!b) {
      put(best, h("p", { class: "muted" }, "no configuration has finished yet"));
      return;
    }
    put(best,
      h("div", { class: "best-value" }, fmtNumber(b.objective), b.spread !== null && b.spread !== undefined ? h("span", { class: "muted" }, ` ± ${fmtNumber(b.spread)}`) : null),
      h("div", { class: "small muted" }, `${study.objective.metric} · configuration #${b.configuration}`),
      h("div", {}, Object.entries(b.hyperparameters).map(([key, value]) =>
        h("span", { class: "chip" }, `${key}=${typeof value === "number" ? fmtNumber(value) : valueText(value)}`))),
      h("div", { class: "small" }, "trials: ", b.trials.map((id) => [h("a", { href: runHref(id) }, id), " "])),
      b.model ? h("div", { class: "small" }, `model ${b.model.name} v${b.model.version} (alias best)`) : null);
  };

  // -- parallel coordinates --
  const renderParallel = () => {
    const study = data.head;
    const rows = [...data.configurations.values()];
    const values = rows.map((row) => data.value(row.configuration));
    const axes = [...study.parameters, objectiveAxis(study.objective.metric, values, direction())];
    parallel.set(axes, rows.map((row, i) => ({ key: row.configuration, values: [...(data.hyperparameters.get(row.configuration) || []), values[i]] })));
    colours = new Map(parallel.lines.map((line) => [line.key, line.colour === null ? "rgba(75, 85, 99, 0.6)" : rampColour(line.colour, 0.75)]));
  };

  // -- every trial's validation curve --
  const renderCurves = () => {
    const trials = data.ordered.filter((trial) => trial.curve.length);
    const epochs = Math.max(0, ...trials.map((trial) => trial.curve.length));
    const shape = trials.map((trial) => trial.id).join("\u0000");
    if (shape !== curveShape) {
      if (curves) curves.destroy();
      curves = null;
      curveShape = shape;
      seriesTrials = trials;
      if (!trials.length) return;
      const rungs = data.head.searcher.rungs;
      curves = new Chart(curvesBox, "study-curves", trials.map((trial) => ({
        label: trial.id,
        stroke: (u, index) => {
          const configuration = seriesTrials[index - 1]?.configuration;
          if (configuration === highlighted) return "#111827";
          return isSelected(configuration) ? colours.get(configuration) || GREY : GREY;
        },
      })), {
        xLabel: "epoch", yLabel: data.head.objective.metric, height: 320, cursorPoints: false, legend: false, integerX: true,
        decorate: (u) => markRungs(u, rungs),
      });
    }
    seriesTrials = trials;
    if (!curves) {
      curvesNote.textContent = "no validation values yet";
      return;
    }
    const x = Array.from({ length: epochs }, (_, i) => i + 1);
    curves.set([x, ...trials.map((trial) => x.map((_, i) => trial.curve[i] ?? null))]);
    curvesNote.textContent = `${trials.length} trials with validation values · epochs ${epochs}`
      + `${data.head.searcher.rungs.length ? " · dashed lines: ASHA's rungs" : ""}`;
  };

  // -- the trials table, one page at a time --
  const objectiveOf = (trial) => trial.objective ?? [...trial.curve].reverse().find((v) => v !== null) ?? null;
  const matching = () => {
    const wanted = statusFilter.value;
    const shown = data.ordered.filter((trial) => isSelected(trial.configuration) && (wanted === "all" || trial.status === wanted));
    if (sortBy.value === "objective") {
      const sign = direction() === "max" ? -1 : 1;
      shown.sort((a, b) => {
        const va = objectiveOf(a);
        const vb = objectiveOf(b);
        if (va === null || vb === null) return (va === null) - (vb === null);
        return sign * (va - vb);
      });
    } else if (sortBy.value === "newest") {
      shown.sort((a, b) => (b.submitted_at ?? 0) - (a.submitted_at ?? 0));
    }
    return shown;
  };

  const statusCell = (trial) => {
    if (trial.status === "stopped") {
      const rung = trial.stopped_at_rung;
      const epochs = data.head.searcher.rungs[rung];
      return h("span", { title: verdictText(data.stops.get(trial.configuration), data.head) },
        badge("stopped early", "stopped"), h("span", { class: "small muted" }, ` at rung ${rung} (${epochs} ep)`));
    }
    if (trial.status === "active") return badge(trial.job_status || "active", trial.job_status || "pending");
    return badge(trial.status, trial.status);
  };

  const renderTable = () => {
    tableFrame = 0;
    const study = data.head;
    const shown = matching();
    const pages = Math.max(1, Math.ceil(shown.length / PAGE_ROWS));
    page = Math.min(page, pages - 1);
    const rows = shown.slice(page * PAGE_ROWS, (page + 1) * PAGE_ROWS);
    const rungs = study.searcher.rungs;
    const columns = ["trial", "config", ...(study.folds ? ["fold"] : []), ...study.parameters.map((p) => p.name), "status", "rung reached",
      ...rungs.map((epochs, i) => `rung ${i} @${epochs} ep`), `${study.objective.metric} (final)`, "epochs"];
    const body = rows.map((trial) => h("tr", {
      class: `trial ${trial.status}${trial.configuration === study.best?.configuration ? " best" : ""}`,
      dataset: { trial: trial.id, status: trial.status, configuration: String(trial.configuration) },
      onmouseenter: () => hover(trial.configuration),
      onmouseleave: () => hover(null),
    },
      h("td", { class: "run" }, h("a", { href: runHref(trial.id) }, trial.id)),
      h("td", { class: "num" }, `#${trial.configuration}`),
      study.folds ? h("td", { class: "num" }, trial.fold ?? "–") : null,
      trial.hyperparameters.map((value) => h("td", { class: "num" }, typeof value === "number" ? fmtNumber(value) : valueText(value))),
      h("td", {}, statusCell(trial)),
      h("td", { class: "num" }, trial.rung === null ? "–" : `${trial.rung} (${rungs[trial.rung]} ep)`),
      trial.at_rungs.map((value, i) => h("td", { class: `num${trial.stopped_at_rung === i ? " stopped-at" : ""}` }, fmtNumber(value))),
      h("td", { class: "num" }, fmtNumber(trial.objective)),
      h("td", { class: "num" }, `${trial.curve.length}${study.trial_epochs ? `/${study.trial_epochs}` : ""}`)));
    clear(tableBox, table(columns, body, { class: "trials-table" }));
    tableBox.dataset.shown = String(shown.length);
    tableBox.dataset.total = String(data.ordered.length);
    const filtered = shown.length !== data.ordered.length;
    clear(pager,
      h("button", { disabled: page === 0, onclick: () => { page -= 1; renderTable(); } }, "‹"),
      h("span", { class: "muted" }, ` ${shown.length ? page * PAGE_ROWS + 1 : 0}–${page * PAGE_ROWS + rows.length} of ${shown.length}`
        + `${filtered ? ` matching (${data.ordered.length} trials)` : " trials"} `),
      h("button", { disabled: page >= pages - 1, onclick: () => { page += 1; renderTable(); } }, "›"));
  };
  const scheduleTable = () => {
    if (data.head && !tableFrame) tableFrame = requestAnimationFrame(renderTable);
  };
  statusFilter.addEventListener("change", () => { page = 0; scheduleTable(); });
  sortBy.addEventListener("change", () => { page = 0; scheduleTable(); });

  const hover = (configuration) => {
    highlighted = configuration;
    parallel.highlight(configuration);
    if (curves) curves.restyle();
  };

  // -- ASHA's verdicts, newest first --
  const renderVerdicts = () => {
    const list = [...data.decisions.values()].reverse().slice(0, 20);
    clear(verdicts, !list.length ? null : h("div", { class: "card" },
      h("h2", {}, `ASHA's verdicts (${data.decisions.size}; the newest 20)`),
      table(["at", "configuration", "rung", "verdict", "reason"], list.map((d) => [
        fmtTime(d.at), `#${d.configuration}`, `${d.rung} (${d.epochs} ep)`,
        badge(d.action === "stop" ? "stopped" : "continues", d.action === "stop" ? "stopped" : "finished"), verdictText(d, data.head)]))));
  };

  const stop = every(500, async () => {
    const running = !data.head || data.head.status === "running";
    if (Date.now() - lastFetch < (running ? RUNNING_POLL_MS : ENDED_POLL_MS) - 250) return;
    lastFetch = Date.now();
    const answer = await getJSON("/api/study", { name, since: data.version });
    const headBefore = JSON.stringify(data.head);
    const changed = data.merge(answer);
    if (JSON.stringify(data.head) !== headBefore) renderHead();
    if (!changed && !stale) return;
    stale = true;  // until drawn: a failed drawing is tried again at the next poll, changes or not
    renderParallel();
    renderCurves();
    renderVerdicts();
    scheduleTable();
    stale = false;
  }, errors);
  return () => {
    stop();
    if (tableFrame) cancelAnimationFrame(tableFrame);
    parallel.destroy();
    if (curves) curves.destroy();
  };
}

/** ASHA's rungs as dashed vertical lines on the curves chart */
function markRungs(u, rungs) {
  if (!rungs.length) return;
  const { ctx } = u;
  const { top, height } = u.bbox;
  ctx.save();
  ctx.strokeStyle = "rgba(17, 24, 39, 0.35)";
  ctx.setLineDash([4, 4]);
  ctx.lineWidth = 1;
  for (const epochs of rungs) {
    const x = Math.round(u.valToPos(epochs, "x", true));
    ctx.beginPath();
    ctx.moveTo(x, top);
    ctx.lineTo(x, top + height);
    ctx.stroke();
  }
  ctx.restore();
}
