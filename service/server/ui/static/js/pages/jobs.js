import { api, enc } from "../api.js";
import { fmtDuration, fmtTime, h, progressOf, STATES, stateBadge, TERMINAL } from "../dom.js";

export async function jobsPage(main, { params, signal }) {
  const chosen = new Set(params.getAll("state").filter((s) => STATES.includes(s)));
  const filters = h("fieldset", { class: "filters" }, h("legend", {}, "State"),
    STATES.map((s) => {
      const box = h("input", { type: "checkbox", value: s, id: `f-${s}`, checked: chosen.has(s) });
      box.addEventListener("change", () => {
        const q = new URLSearchParams();
        for (const el of filters.querySelectorAll("input:checked")) q.append("state", el.value);
        location.hash = `#/jobs${q.size ? `?${q}` : ""}`;
      });
      return h("label", { for: `f-${s}` }, box, s);
    }));
  const body = h("tbody");
  const compare = h("button", { type: "button", id: "compare-selected", disabled: true }, "Compare selected");
  const more = h("button", { type: "button", id: "more", hidden: true }, "More");
  const selected = new Set();
  compare.addEventListener("click", () => {
    location.hash = `#/compare?ids=${[...selected].map(enc).join(",")}`;
  });
  main.append(
    h("div", { class: "row" }, h("h1", {}, "Jobs"), h("a", { class: "button", href: "#/submit" }, "Submit a job")),
    filters,
    h("table", { class: "jobs", id: "jobs-table" },
      h("thead", {}, h("tr", {}, ["", "job", "kind", "model", "state", "progress", "ETA", "created"]
        .map((t) => h("th", {}, t)))),
      body),
    h("div", { class: "row" }, more, compare));

  const query = [...chosen].map((s) => `state=${enc(s)}`).join("&");
  let cursor = null;
  const rows = new Map();

  function row(job) {
    const { frac, eta } = progressOf(job);
    const box = h("input", { type: "checkbox", checked: selected.has(job.id), "aria-label": `select ${job.id}` });
    box.addEventListener("change", () => {
      if (box.checked) selected.add(job.id); else selected.delete(job.id);
      compare.disabled = selected.size < 1;
    });
    const p = job.progress;
    return h("tr", { dataset: { job: job.id } },
      h("td", {}, box),
      h("td", {}, h("a", { href: `#/jobs/${enc(job.id)}` }, job.id)),
      h("td", {}, job.kind), h("td", {}, job.model), h("td", {}, stateBadge(job.state)),
      h("td", {}, h("progress", { max: 1, value: frac.toFixed(3) }),
        ` epoch ${p.epoch ?? 0}/${p.epochs}`, p.step ? `, step ${p.step}` : ""),
      h("td", { class: "eta" }, TERMINAL.has(job.state) ? "—" : fmtDuration(eta)),
      h("td", {}, fmtTime(job.created_at)));
  }

  async function load(append) {
    const page = await api(`/v1/jobs?limit=50&${query}${append && cursor ? `&cursor=${enc(cursor)}` : ""}`, { signal });
    if (!append) { body.replaceChildren(); rows.clear(); }
    for (const job of page.items) {
      const tr = row(job);
      rows.set(job.id, tr);
      body.append(tr);
    }
    if (!body.children.length) body.append(h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No jobs yet.")));
    cursor = page.next_cursor;
    more.hidden = !cursor;
    return page.items;
  }

  more.addEventListener("click", () => load(true));
  await load(false);
  // refresh the first page while something is still moving
  const timer = setInterval(async () => {
    if ([...body.querySelectorAll("[data-state]")].every((b) => TERMINAL.has(b.dataset.state))) return;
    try {
      const page = await api(`/v1/jobs?limit=50&${query}`, { signal });
      for (const job of page.items) rows.get(job.id)?.replaceWith(rows.set(job.id, row(job)).get(job.id));
    } catch { /* next tick */ }
  }, 3000);
  signal.addEventListener("abort", () => clearInterval(timer));
}
