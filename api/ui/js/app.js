// Router and sign-in. Routes: #/jobs, #/jobs/<id>, #/admin/models, #/admin/training[/<id>].
import { ApiError, api, session } from "./api.js";
import { h, put } from "./dom.js";
import { jobView } from "./job.js";
import { jobsView } from "./jobs.js";
import { modelsView, trainingView } from "./admin.js";

const view = document.getElementById("view");
let teardown = null;

function signIn(message) {
  const input = h("input", { id: "api-key", type: "password", autocomplete: "off", required: true });
  const error = h("p", { class: "error", role: "alert" }, message || "");
  const form = h("form", { onsubmit: async (e) => {
    e.preventDefault();
    session.set(input.value.trim());
    try {
      await api("/api/v1/jobs?limit=1");
      route();
    } catch (err) {
      session.clear();
      error.textContent = err instanceof ApiError && err.status === 401 ? "This API key is not valid." : err.message;
    }
  } },
  h("label", { for: "api-key" }, "API key"), input, h("button", { type: "submit", class: "primary" }, "Sign in"), error);
  put(view, h("div", { class: "card signin" }, h("h1", {}, "Sign in"),
    h("p", { class: "muted" }, "Paste your API key. It is kept for this browser tab's session only."), form));
  input.focus();
}

function route() {
  if (teardown) { teardown(); teardown = null; }
  const signedIn = Boolean(session.key);
  document.getElementById("nav").hidden = !signedIn;
  document.getElementById("sign-out").hidden = !signedIn;
  if (!signedIn) { signIn(); return; }
  const [path, query] = (location.hash.slice(1) || "/jobs").split("?");
  const parts = path.split("/").filter(Boolean);
  const params = new URLSearchParams(query || "");
  document.querySelectorAll("#nav a").forEach((a) => a.removeAttribute("aria-current"));
  const current = parts[0] === "admin" ? parts[1] : "jobs";
  document.querySelector(`#nav a[data-nav="${current}"]`)?.setAttribute("aria-current", "page");
  if (parts[0] === "jobs" && parts[1]) teardown = jobView(view, parts[1]);
  else if (parts[0] === "admin" && parts[1] === "models") teardown = modelsView(view);
  else if (parts[0] === "admin" && parts[1] === "training") teardown = trainingView(view, parts[2]);
  else teardown = jobsView(view, params);
  document.title = `MSG-LDM · ${parts.join(" ") || "jobs"}`;
}

document.getElementById("sign-out").addEventListener("click", () => { session.clear(); location.hash = "#/jobs"; route(); });
window.addEventListener("hashchange", route);
window.addEventListener("msgldm:unauthorized", () => { session.clear(); if (teardown) teardown(); teardown = null; signIn("Your API key was rejected; sign in again."); });
route();
