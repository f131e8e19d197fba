// Admin: model versions side by side (promote / roll back) and training runs (live curves, cancel).
// Built against the registry contract; a server without the registry answers 404 and the page says so.
import { ApiError, api } from "./api.js";
import { Poller, badge, fmt, h, progressBar, shortId, when, put } from "./dom.js";
import { linePlot } from "./plot.js";

function unavailable(root, title, e) {
  const text = e instanceof ApiError && e.status === 404
    ? "This server has no model registry yet (the registry API answered 404)."
    : e instanceof ApiError && e.status === 403 ? "Admin pages need an admin API key." : `Error: ${e.message}`;
  put(root, h("h1", {}, title), h("p", { class: "notice", id: "admin-unavailable" }, text));
}

export function modelsView(root) {
  const msg = h("p", { id: "models-message", role: "status", "aria-live": "polite" });
  async function act(url, body) {
    try {
      await api(url, { method: "POST", json: body });
      msg.className = ""; msg.textContent = "Done.";
    } catch (e) {
      if (e.code === "below_baselines" && confirm(`${e.message}\n\nPromote anyway (force)?`)) {
        return act(url, { ...body, force: true });
      }
      msg.className = "error"; msg.textContent = `${e.code}: ${e.message}`;
    }
    return poller.fn();
  }
  const poller = new Poller(async () => {
    let data;
    try { data = await api("/api/v1/models"); } catch (e) { poller.stop(); unavailable(root, "Model versions", e); return; }
    const items = data.items || [];
    const targets = [...new Set(items.flatMap((m) => Object.keys(m.metrics?.per_target || {})))];
    const baselines = [...new Set(items.flatMap((m) => Object.keys(m.metrics?.baselines || {})))];
    const metricCells = (m) => [
      ...targets.flatMap((t) => [m.metrics?.per_target?.[t]?.psnr, m.metrics?.per_target?.[t]?.ssim]),
      m.metrics?.mean?.psnr, m.metrics?.mean?.ssim,
      ...baselines.map((b) => (m.metrics?.baselines?.[b] ? `${fmt(m.metrics.baselines[b].psnr)} / ${fmt(m.metrics.baselines[b].ssim, 3)}` : "–")),
    ].map((v, i) => h("td", { class: "num" }, typeof v === "number" ? fmt(v, i % 2 ? 3 : 2) : v ?? "–"));
    const table = h("table", { class: "grid", id: "models" },
      h("thead", {},
        h("tr", {}, h("th", { rowspan: 2 }, "Version"), h("th", { rowspan: 2 }, "Status"), h("th", { rowspan: 2 }, "Preset"),
          h("th", { rowspan: 2 }, "Created"), ...targets.map((t) => h("th", { colspan: 2, class: "num" }, t.toUpperCase())),
          h("th", { colspan: 2, class: "num" }, "Mean"), ...baselines.map((b) => h("th", { rowspan: 2, class: "num" }, `${b} baseline PSNR / SSIM`)),
          h("th", { rowspan: 2 }, "Beats baselines"), h("th", { rowspan: 2 }, "")),
        h("tr", {}, [...targets, "mean"].flatMap(() => [h("th", { class: "num" }, "PSNR"), h("th", { class: "num" }, "SSIM")]))),
      h("tbody", {}, items.map((m) => h("tr", { "data-version": m.version },
        h("td", { class: "mono" }, m.version), h("td", {}, badge(m.status)), h("td", {}, m.preset || ""),
        h("td", {}, when(m.created_at)), ...metricCells(m),
        h("td", {}, m.metrics?.beats_baselines === undefined ? "–" : m.metrics.beats_baselines ? "yes" : "no"),
        h("td", {}, m.status === "serving"
          ? h("button", { type: "button", onclick: () => confirm(`Roll back from ${m.version}?`)
            && act(`/api/v1/admin/models/${m.version}/rollback`, {}) }, "Roll back")
          : h("button", { type: "button", class: "primary", "data-promote": m.version, onclick: () => {
            const reason = prompt(`Promote ${m.version} to serving? Reason:`, "");
            if (reason !== null) act(`/api/v1/admin/models/${m.version}/promote`, { force: false, reason });
          } }, "Promote"))))));
    put(root, h("h1", {}, "Model versions"),
      h("p", {}, "Serving: ", h("span", { class: "mono", id: "serving" }, data.serving || "none")), msg, table);
  }, 5000);
  poller.start();
  return () => poller.stop();
}

// The trainer's checks between stages (docs/model.md "Gates"): a failed one stops the run.
function gatesTable(gates) {
  const rows = Object.values(gates).sort((a, b) => a.stage - b.stage);
  if (!rows.length) return null;
  return h("div", {}, h("h3", {}, "Gates"),
    h("table", { class: "grid", id: "run-gates" },
      h("thead", {}, h("tr", {}, ["Stage", "Gate", "Value", "Threshold", "Result"].map((t) => h("th", {}, t)))),
      h("tbody", {}, rows.map((g) => h("tr", { "data-gate": g.name },
        h("td", {}, String(g.stage)), h("td", { class: "mono" }, g.name), h("td", {}, g.value.toFixed(3)),
        h("td", {}, g.threshold.toFixed(3)), h("td", {}, h("span", { class: `badge ${g.passed ? "succeeded" : "failed"}` }, g.passed ? "passed" : "failed")))))));
}

function curves(history, pick) {
  const series = {};
  history.forEach((e, i) => {
    for (const [name, y] of Object.entries(pick(e) || {})) {
      const key = `stage ${e.stage} ${name}`;
      (series[key] ||= []).push([e.step ?? i, y]);
    }
  });
  return Object.entries(series).map(([name, points]) => ({ name, points }));
}

export function trainingView(root, runId) {
  const poller = new Poller(async () => {
    let list;
    try { list = await api("/api/v1/admin/training-runs"); } catch (e) { poller.stop(); unavailable(root, "Training runs", e); return; }
    const runs = list.items || [];
    const selected = runId || runs[0]?.id;
    const table = h("table", { class: "grid", id: "training-runs" },
      h("thead", {}, h("tr", {}, ["Run", "Status", "Stage", "Progress", "Preset", "Created", "Model version"]
        .map((t) => h("th", {}, t)))),
      h("tbody", {}, runs.length ? runs.map((r) => h("tr", { "data-run": r.id },
        h("td", {}, h("a", { class: "mono", href: `#/admin/training/${r.id}` }, shortId(r.id))), h("td", {}, badge(r.status)),
        h("td", {}, r.stage ?? "–"), h("td", {}, progressBar(r.progress || 0, r.status), `${r.progress || 0}%`),
        h("td", {}, r.preset || ""), h("td", {}, when(r.created_at)), h("td", { class: "mono" }, r.model_version || "–")))
        : h("tr", {}, h("td", { colspan: 7, class: "muted" }, "No training runs."))));
    const detail = h("section", { id: "run-detail" });
    put(root, h("h1", {}, "Training runs"), table, detail);
    if (!selected) return;
    const run = await api(`/api/v1/admin/training-runs/${selected}`);
    const history = run.history || [];
    const loss = linePlot(curves(history, (e) => e.losses), { log: true });
    const val = linePlot(curves(history, (e) => e.val));
    put(detail,
      h("div", { class: "toolbar" }, h("h2", {}, `Run ${shortId(run.id)}`), badge(run.status),
        ["queued", "running"].includes(run.status) ? h("button", { type: "button", class: "danger", onclick: async () => {
          if (!confirm("Cancel this training run?")) return;
          await api(`/api/v1/admin/training-runs/${run.id}/cancel`, { method: "POST" }).catch((e) => alert(e.message));
          poller.fn();
        } }, "Cancel run") : null),
      run.error_code ? h("p", { class: "error" }, `${run.error_code}: ${run.error_message || ""}`) : null,
      gatesTable(run.gates || {}),
      h("div", { class: "cols" },
        h("div", {}, h("h3", {}, "Loss (log scale)"), loss.svg, loss.legend),
        h("div", {}, h("h3", {}, "Validation"), val.svg, val.legend)),
      h("h3", {}, "Log"), h("pre", { class: "log" }, run.log_tail || ""));
  }, 3000);
  poller.start();
  return () => poller.stop();
}
