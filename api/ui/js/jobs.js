// Jobs list: live (polled every 2 s), filtered by status (server side) and by target or id (client side).
import { api } from "./api.js";
import { Poller, badge, h, progressBar, shortId, when, put } from "./dom.js";

const STATUSES = ["", "queued", "running", "succeeded", "failed", "cancelled"];

export function jobsView(root, params) {
  const state = { status: params.get("status") || "", target: params.get("target") || "", text: "", limit: 50 };
  const statusSelect = h("select", { id: "filter-status", "aria-label": "Status filter",
    onchange: (e) => { state.status = e.target.value; poller.fn(); } },
  STATUSES.map((s) => h("option", { value: s, selected: s === state.status }, s || "any status")));
  const targetSelect = h("select", { id: "filter-target", "aria-label": "Target filter",
    onchange: (e) => { state.target = e.target.value; draw(); } },
  ["", "t1", "t2", "t1ce", "flair"].map((t) => h("option", { value: t, selected: t === state.target }, t || "any target")));
  const search = h("input", { type: "search", placeholder: "job id starts with…", "aria-label": "Search job id",
    oninput: (e) => { state.text = e.target.value.trim().toLowerCase(); draw(); } });
  const more = h("button", { type: "button", onclick: () => { state.limit += 50; poller.fn(); } }, "Show more");
  const info = h("span", { class: "muted", id: "jobs-updated", "aria-live": "polite" });
  const body = h("tbody", { id: "jobs-body" });
  let items = [];
  let hasMore = false;

  put(root,
    h("h1", {}, "Jobs"),
    h("div", { class: "toolbar" }, statusSelect, targetSelect, search, info),
    h("table", { class: "grid", "aria-label": "Jobs" },
      h("thead", {}, h("tr", {}, ["Job", "Status", "Progress", "Targets", "Inputs", "Created", "Model version"]
        .map((t) => h("th", { scope: "col" }, t)))),
      body),
    h("p", {}, more));

  function draw() {
    const rows = items.filter((j) => (!state.target || j.targets.includes(state.target))
      && (!state.text || j.id.startsWith(state.text)));
    more.hidden = !hasMore;
    put(body, ...(rows.length ? rows.map((j) => h("tr", { "data-job": j.id, "data-status": j.status },
      h("td", {}, h("a", { class: "mono", href: `#/jobs/${j.id}`, title: j.id }, shortId(j.id))),
      h("td", {}, badge(j.status), j.error ? h("div", { class: "error" }, j.error.code) : null),
      h("td", {}, progressBar(j.progress, j.status), h("span", { class: "muted" },
        j.status === "queued" && j.queue_position !== null ? `#${j.queue_position + 1} in queue` : `${j.progress}% ${j.phase}`)),
      h("td", {}, j.targets.join(", ")),
      h("td", {}, j.inputs.filter((m) => !j.targets.includes(m)).join(", "),
        j.inputs.some((m) => j.targets.includes(m)) ? h("span", { class: "muted" }, " + reference") : null),
      h("td", {}, when(j.created_at)),
      h("td", { class: "mono" }, j.model_version || "–")))
      : [h("tr", {}, h("td", { colspan: 7, class: "muted" }, "No jobs match."))]));
  }

  const poller = new Poller(async () => {
    const q = new URLSearchParams({ limit: state.limit });
    if (state.status) q.set("status", state.status);
    const page = await api(`/api/v1/jobs?${q}`);
    items = page.items;
    hasMore = Boolean(page.next_cursor);
    info.textContent = `${items.length} job(s) · updated ${new Date().toLocaleTimeString()}`;
    draw();
  }, 2000);
  poller.start();
  return () => poller.stop();
}
