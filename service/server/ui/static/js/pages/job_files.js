// Checkpoints: name, epoch, step, size, sha256, and a download button. A download asks the
// API where the file is (/link): storage's presigned URL is opened as a plain navigation (the
// key is not needed there and must not go there); otherwise the bytes are fetched with the
// key, their sha256 checked against the listing, and saved from a blob: URL.

import { api, enc, sha256Hex } from "../api.js";
import { fmtBytes, fmtTime, h, problemBox } from "../dom.js";

function save(href, filename) {
  const a = h("a", { href, download: filename || null, rel: "noopener", hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
}

async function download(base, jobId, ck, note) {
  note.textContent = "preparing…";
  const link = await api(`${base}/checkpoints/${enc(ck.name)}/link`);
  if (link.presigned) {
    save(link.url, null);
    note.textContent = `download started (expected sha256 ${ck.sha256.slice(0, 12)}…)`;
    return;
  }
  const resp = await api(link.url, { raw: true });
  const blob = await resp.blob();
  const sha = await sha256Hex(blob);
  if (sha !== ck.sha256) {
    note.textContent = `sha256 mismatch: got ${sha}, listed ${ck.sha256}; not saved`;
    return;
  }
  const url = URL.createObjectURL(blob);
  save(url, `${jobId}-${ck.name}-${ck.primary_file.split("/").pop()}`);
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
  note.textContent = "downloaded, sha256 verified";
}

export function checkpointsPanel(base, jobId, signal) {
  const body = h("tbody");
  const el = h("div", {}, h("table", { id: "checkpoints" },
    h("thead", {}, h("tr", {}, ["name", "epoch", "step", "size", "sha256", "created", ""].map((t) => h("th", {}, t)))),
    body));
  let busy = false;
  let shown = null;  // the listing drawn last: an unchanged one is not redrawn under a click
  async function refresh() {
    if (busy || signal.aborted) return;
    busy = true;
    try {
      const list = await api(`${base}/checkpoints`, { signal });
      const key = JSON.stringify(list.items);
      if (key === shown) return;
      shown = key;
      body.replaceChildren(...list.items.map((ck) => {
        const note = h("span", { class: "muted note" });
        const btn = h("button", { type: "button", class: "download", dataset: { name: ck.name } }, "Download");
        btn.addEventListener("click", () => download(base, jobId, ck, note)
          .catch((err) => note.replaceChildren(problemBox(err))));
        return h("tr", { dataset: { checkpoint: ck.name, sha256: ck.sha256 } },
          h("td", {}, ck.name), h("td", {}, ck.epoch ?? "—"), h("td", {}, ck.step ?? "—"),
          h("td", {}, fmtBytes(ck.size)), h("td", { class: "hash", title: ck.sha256 }, ck.sha256),
          h("td", {}, fmtTime(ck.created)), h("td", {}, btn, " ", note));
      }));
      if (!list.items.length) body.append(h("tr", {}, h("td", { colspan: 7, class: "muted" }, "None yet.")));
    } catch (err) {
      shown = null;
      if (!signal.aborted) body.replaceChildren(h("tr", {}, h("td", { colspan: 7 }, problemBox(err))));
    } finally { busy = false; }
  }
  return { el, refresh };
}
