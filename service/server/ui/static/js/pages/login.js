import { api, ApiError, auth } from "../api.js";
import { h } from "../dom.js";

export async function loginPage(main) {
  const input = h("input", {
    type: "password", id: "api-key", name: "api-key", autocomplete: "off",
    placeholder: "gmk_…", required: true, size: 48,
  });
  const error = h("p", { class: "field-error", id: "login-error", role: "alert" });
  const form = h("form", { id: "login-form", method: "post", class: "card narrow" },
    h("h1", {}, "Sign in"),
    h("p", { class: "muted" }, "Paste an API key (", h("code", {}, "greenmim keys create"),
      "). It stays in this tab only and is sent as the bearer header."),
    h("label", { for: "api-key" }, "API key"), input, error,
    h("button", { type: "submit", id: "sign-in" }, "Sign in"));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    error.textContent = "";
    auth.set(input.value.trim());
    try {
      await api("/v1/jobs?limit=1");
      location.hash = "#/jobs";
    } catch (err) {
      auth.clear();
      error.textContent = err instanceof ApiError ? err.message : `cannot reach the API: ${err}`;
    }
  });
  main.append(form);
  input.focus();
}
