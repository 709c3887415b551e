// The dashboard's router: hash routes (#/jobs, #/jobs/<id>, #/submit, #/compare?ids=a,b),
// one page at a time; leaving a page aborts its requests, streams and timers.

import { auth } from "./api.js";
import { $, h, problemBox } from "./dom.js";
import { loginPage } from "./pages/login.js";
import { jobsPage } from "./pages/jobs.js";
import { jobPage } from "./pages/job.js";
import { submitPage } from "./pages/submit.js";
import { comparePage } from "./pages/compare.js";

const ROUTES = [
  [/^#\/login$/, loginPage],
  [/^#\/jobs\/([A-Za-z0-9_.-]+)$/, jobPage],
  [/^#\/submit$/, submitPage],
  [/^#\/compare$/, comparePage],
  [/^#\/jobs$/, jobsPage],
];

let current = null;

function parseHash() {
  const [path, query = ""] = (location.hash || "#/jobs").split("?");
  return { path, params: new URLSearchParams(query) };
}

async function render() {
  current?.abort();
  const controller = new AbortController();
  current = controller;
  const main = $("#main");
  main.replaceChildren();
  const { path, params } = parseHash();
  if (!auth.get() && path !== "#/login") {
    location.replace("#/login");
    return;
  }
  $("#nav").hidden = !auth.get();
  const route = ROUTES.find(([re]) => re.test(path));
  if (!route) {
    main.append(h("p", { class: "problem" }, "No such page. ", h("a", { href: "#/jobs" }, "Your jobs")));
    return;
  }
  const match = path.match(route[0]);
  try {
    await route[1](main, { args: match.slice(1), params, signal: controller.signal });
  } catch (err) {
    if (controller.signal.aborted) return;
    main.replaceChildren(problemBox(err));
  }
}

window.addEventListener("hashchange", render);
window.addEventListener("greenmim:signed-out", () => location.replace("#/login"));
$("#sign-out").addEventListener("click", () => {
  auth.clear();
  location.hash = "#/login";
});
render();
