// Several jobs' loss curves on one chart (x = step). Pick jobs below; the choice is kept in
// the address (#/compare?ids=a,b) so a comparison can be bookmarked.

import { allMetrics, api, enc } from "../api.js";
import { LineChart } from "../charts.js";
import { h, stateBadge } from "../dom.js";

export async function comparePage(main, { params, signal }) {
  const ids = (params.get("ids") || "").split(",").map(decodeURIComponent).filter(Boolean);
  const jobs = await api("/v1/jobs?limit=100", { signal });
  const picker = h("fieldset", { class: "filters", id: "compare-picker" }, h("legend", {}, "Jobs"),
    jobs.items.map((j) => {
      const box = h("input", { type: "checkbox", value: j.id, checked: ids.includes(j.id), id: `c-${j.id}` });
      box.addEventListener("change", () => {
        const chosen = [...picker.querySelectorAll("input:checked")].map((b) => enc(b.value));
        location.hash = `#/compare?ids=${chosen.join(",")}`;
      });
      return h("label", { for: `c-${j.id}` }, box, `${j.id} (${j.kind}, ${j.model}) `, stateBadge(j.state));
    }));
  const chartEl = h("div", { id: "chart-compare" });
  main.append(h("h1", {}, "Compare loss curves"), chartEl, picker);
  if (!ids.length) {
    chartEl.append(h("p", { class: "muted" }, "Choose jobs below."));
    return;
  }
  const series = await Promise.all(ids.map((id) => allMetrics(id, signal)));
  const chart = new LineChart(chartEl, "step loss", ids);
  chartEl.dataset.series = String(ids.length);
  signal.addEventListener("abort", () => chart.destroy());
  series.forEach((records, i) => {
    for (const r of records) if (r.type === "step") chart.set(r.step, i, r.loss);
  });
}
