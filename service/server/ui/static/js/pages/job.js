// One job: state, progress, live charts (metric stream), timeline, previews, checkpoints,
// the log tail, cancel. Every piece of text from the job is set as text (see dom.js).

import { api, enc, metricStream } from "../api.js";
import { LineChart } from "../charts.js";
import { fmtDuration, fmtTime, h, problemBox, progressOf, stateBadge, TERMINAL } from "../dom.js";
import { checkpointsPanel } from "./job_files.js";
import { logsPanel, previewsPanel } from "./job_views.js";

const NOT_VALIDATION = new Set(["type", "step", "epoch", "time", "train_loss"]);

export async function jobPage(main, { args: [jobId], signal }) {
  const base = `/v1/jobs/${enc(jobId)}`;
  let job = await api(base, { signal });

  const head = h("div", { class: "job-head" });
  const charts = h("section", { class: "charts" });
  const timeline = h("ol", { class: "timeline", id: "timeline" });
  const previews = previewsPanel(base, signal);
  const checkpoints = checkpointsPanel(base, jobId, signal);
  const logs = logsPanel(base, signal);
  main.append(head,
    h("h2", {}, "Metrics"), charts,
    h("div", { class: "two" },
      h("section", {}, h("h2", {}, "Timeline"), timeline),
      h("section", {}, h("h2", {}, "Checkpoints"), checkpoints.el)),
    h("h2", {}, "Reconstruction previews"), previews.el,
    h("h2", {}, "Log"), logs.el,
    h("h2", {}, "Spec"), h("pre", { class: "spec", id: "spec" }, JSON.stringify(job.spec, null, 2)));

  // one cancel button for the page's life (redrawing it could swallow a click)
  const cancel = h("button", { type: "button", id: "cancel", class: "danger" }, "Cancel job");
  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      job = await api(`${base}/cancel`, { method: "POST", signal });
      drawHead();
      refreshTimeline();
    } catch (err) { head.append(problemBox(err)); }
  });

  // redrawn only when the job changed: a redraw replaces elements a user may be reading or
  // clicking (and a test may be holding)
  let drawn = "";
  function drawHead() {
    const { frac, eta } = progressOf(job);
    const key = JSON.stringify([job, fmtDuration(eta)]);
    if (key === drawn) return;
    drawn = key;
    cancel.hidden = TERMINAL.has(job.state) || job.state === "cancelling";
    const p = job.progress;
    head.replaceChildren(...[
      h("div", { class: "row" },
        h("h1", {}, h("span", { id: "job-id" }, job.id), " ", stateBadge(job.state)), cancel),
      h("p", { class: "muted" }, `${job.kind} · ${job.model} · created ${fmtTime(job.created_at)}`),
      h("p", {}, h("progress", { max: 1, value: frac.toFixed(3), id: "progress" }),
        ` epoch ${p.epoch ?? 0}/${p.epochs}`, p.step ? ` · step ${p.step}` : "",
        TERMINAL.has(job.state) ? "" : ` · ETA ${fmtDuration(eta)}`),
      job.error
        ? h("div", { class: "problem", id: "job-error", role: "alert" },
          h("strong", {}, job.error.type), " ", h("span", { class: "message" }, job.error.message))
        : null,
    ].filter(Boolean));
  }

  async function refreshTimeline() {
    const events = await api(`${base}/events`, { signal });
    timeline.replaceChildren(...events.items.map((e) => h("li", {},
      h("time", {}, fmtTime(e.at)), " ", e.from_state ? `${e.from_state} → ` : "", stateBadge(e.to_state),
      e.reason ? h("span", { class: "muted" }, ` ${e.reason}`) : null)));
  }

  drawHead();
  await refreshTimeline();

  // charts: loss (steps + epoch means + validation loss), lr, images/s, validation metrics
  const mk = (id, title, series) => {
    const el = h("div", { id });
    charts.append(el);
    return new LineChart(el, title, series);
  };
  const loss = mk("chart-loss", "loss", ["step loss", "train loss (epoch)", "validation loss"]);
  const lr = mk("chart-lr", "learning rate", ["lr"]);
  const speed = mk("chart-speed", "images/s", ["images/s"]);
  const valEl = h("div", { id: "chart-val" });
  charts.append(valEl);
  let val = null;
  const valKeys = [];
  let received = 0;
  signal.addEventListener("abort", () => [loss, lr, speed, val].forEach((c) => c?.destroy()));

  function onMetric(r) {
    if (r.type === "step") {
      loss.set(r.step, 0, r.loss);
      lr.set(r.step, 0, r.lr);
      speed.set(r.step, 0, r.images_per_s);
    } else if (r.type === "epoch") {
      loss.set(r.step, 1, r.train_loss);
      loss.set(r.step, 2, r.val_loss);
      const keys = Object.keys(r).filter((k) => !NOT_VALIDATION.has(k) && typeof r[k] === "number");
      if (!val && keys.length) {
        valKeys.push(...keys);
        val = new LineChart(valEl, "validation (per epoch)", keys);
      }
      valKeys.forEach((k, i) => val?.set(r.step, i, r[k]));
      previews.refresh();
    } else if (r.type === "event" && (r.event === "checkpoint" || r.event === "end")) {
      checkpoints.refresh();
      if (r.event === "end") previews.refresh();
    }
  }

  async function refreshJob() {
    job = await api(base, { signal });
    drawHead();
    await refreshTimeline();
  }

  // records received and connections made, for the curious (and the browser tests)
  const stream = metricStream(jobId, {
    metric: (r) => {
      onMetric(r);
      charts.dataset.records = String(++received);
      charts.dataset.connects = String(stream.connects);
    },
    state: () => refreshJob().catch(() => {}),
    end: async () => {
      await refreshJob().catch(() => {});
      checkpoints.refresh();
      previews.refresh();
      logs.refresh();
    },
    error: (err) => charts.prepend(problemBox(err)),
  }, signal);
  // progress, ETA and new checkpoints between stream events
  const timer = setInterval(() => {
    if (TERMINAL.has(job.state)) return;
    refreshJob().catch(() => {});
    checkpoints.refresh();
  }, 5000);
  signal.addEventListener("abort", () => clearInterval(timer));
  checkpoints.refresh();
  previews.refresh();
}
