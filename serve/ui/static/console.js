// The console's behaviour: the key kept in this tab only (sessionStorage), sent as `Authorization: Bearer` on every
// fetch; fragments rendered (and escaped) by the server; registry values set as text, never as HTML.
"use strict";

const KEY = "adapters-console-key";

function key() {
  return sessionStorage.getItem(KEY) || "";
}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (key()) h.Authorization = "Bearer " + key();
  return h;
}

function notice(text, failed) {
  const box = document.getElementById("notice");
  box.textContent = text;
  box.className = failed ? "failed" : "";
}

async function errorOf(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || response.statusText;
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

async function postJSON(path, body) {
  const response = await fetch(path, {
    method: "POST",
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify(body),
  });
  if (!response.ok) throw new Error(await errorOf(response));
  return response.json();
}

async function getJSON(path) {
  const response = await fetch(path, { headers: headers() });
  if (!response.ok) throw new Error(await errorOf(response));
  return response.json();
}

async function load() {
  const main = document.getElementById("content");
  const response = await fetch(main.dataset.src, { headers: headers() });
  if (!response.ok) {
    main.textContent = "";
    const message = await errorOf(response);
    notice(response.status === 401 ? message + " Enter your API key above." : message, true);
    if (response.status === 401) document.getElementById("api-key").focus();
    return;
  }
  main.innerHTML = await response.text(); // the server's template escaped every registry value
  wire(main);
}

function wire(root) {
  const promote = root.querySelector("#promote-form");
  if (promote) promote.addEventListener("submit", onPromote);
  root.querySelectorAll("[data-rollback]").forEach((b) => b.addEventListener("click", onRollback));
  root.querySelectorAll("[data-admin]").forEach((b) => b.addEventListener("click", onAdmin));
  const playground = root.querySelector("#playground");
  if (playground) playground.addEventListener("submit", onRun);
  const live = root.querySelector("#live-models");
  if (live) startLive(live);
}

async function onPromote(event) {
  event.preventDefault();
  const form = event.target;
  const body = { ref: form.ref.value, stage: form.stage.value.trim() };
  if (form.message.value.trim()) body.message = form.message.value.trim();
  try {
    const done = await postJSON("/ui/api/promote", body);
    await load(); // the page shows the new stage before it says so
    notice("Promoted " + done.ref + " to " + done.stage + (done.was ? " (was " + done.was + ")." : "."));
  } catch (e) {
    notice(e.message, true);
  }
}

async function onRollback(event) {
  const { name, stage } = event.target.dataset;
  const box = document.getElementById("rollback-confirm");
  try {
    const plan = await getJSON("/ui/api/rollback?name=" + encodeURIComponent(name) + "&stage=" + encodeURIComponent(stage));
    document.getElementById("rollback-text").textContent =
      name + "#" + stage + " holds " + plan.now + " now; after the rollback it will hold " + plan.to + ".";
    box.hidden = false;
    const yes = document.getElementById("rollback-yes");
    const no = document.getElementById("rollback-no");
    yes.onclick = async () => {
      box.hidden = true;
      try {
        const done = await postJSON("/ui/api/rollback", { name: name, stage: stage, to: plan.to });
        await load();
        notice("Rolled back " + name + "#" + stage + " to " + done.ref + " (was " + done.was + ").");
      } catch (e) {
        notice(e.message, true);
      }
    };
    no.onclick = () => {
      box.hidden = true;
      event.target.focus();
    };
    yes.focus();
  } catch (e) {
    notice(e.message, true);
  }
}

async function onAdmin(event) {
  const { admin, model } = event.target.dataset;
  try {
    const done = await postJSON(admin, { model: model });
    const what = admin.endsWith("unload") ? (done.unloaded ? "Unloaded " : "Not loaded: ") : "Loaded ";
    notice(what + done.model + ". In memory now: " + (done.adapters.join(", ") || "none") + ".");
  } catch (e) {
    notice(e.message, true);
  }
}

// The playground: every column's request starts at once, each streamed through the server's own API.
function onRun(event) {
  event.preventDefault();
  const form = event.target;
  const models = [];
  if (form.base.checked) models.push(form.dataset.base);
  form.querySelectorAll("input[name=model]").forEach((input) => {
    if (input.value.trim()) models.push(input.value.trim());
  });
  const columns = document.getElementById("pg-columns");
  columns.textContent = "";
  if (!models.length) {
    notice("Choose the base model or at least one version or stage.", true);
    return;
  }
  notice("");
  const chat = form.mode.value === "chat";
  const sampling = {
    max_tokens: Number(form.max_tokens.value),
    temperature: Number(form.temperature.value),
    top_p: Number(form.top_p.value),
    seed: Number(form.seed.value),
    stream: true,
    stream_options: { include_usage: true },
  };
  if (form.response_format.value) sampling.response_format = { type: form.response_format.value };
  const prompt = form.prompt.value;
  models.forEach((model) => {
    const body = Object.assign({ model: model }, sampling);
    if (chat) body.messages = [{ role: "user", content: prompt }];
    else body.prompt = prompt;
    stream(column(columns, model), chat ? "/v1/chat/completions" : "/v1/completions", body, chat);
  });
}

function column(parent, model) {
  const box = document.createElement("section");
  box.className = "column";
  const title = document.createElement("h2");
  title.textContent = model;
  const stats = document.createElement("p");
  stats.className = "stats";
  stats.textContent = "waiting…";
  const text = document.createElement("pre");
  text.className = "answer";
  text.setAttribute("aria-live", "polite");
  box.append(title, stats, text);
  parent.append(box);
  return { stats: stats, text: text };
}

async function stream(view, path, body, chat) {
  const started = performance.now();
  let first = null;
  let tokens = 0;
  try {
    const response = await fetch(path, {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(body),
    });
    if (!response.ok) throw new Error(await errorOf(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) tokens = chunk.usage.completion_tokens;
        const choice = chunk.choices && chunk.choices[0];
        const piece = choice ? (chat ? (choice.delta && choice.delta.content) || "" : choice.text || "") : "";
        if (piece) {
          if (first === null) first = performance.now();
          if (!chunk.usage) tokens += 1;
          view.text.textContent += piece;
        }
        view.stats.textContent = figures(started, first, tokens);
      }
    }
    view.stats.textContent = figures(started, first, tokens) + " · done";
  } catch (e) {
    view.stats.textContent = "failed: " + e.message;
  }
}

function figures(started, first, tokens) {
  if (first === null) return "waiting…";
  const seconds = (performance.now() - first) / 1000;
  const rate = seconds > 0 ? (tokens / seconds).toFixed(1) : "—";
  return "first token " + ((first - started) / 1000).toFixed(2) + " s · " + tokens + " tokens · " + rate + " tok/s";
}

// Live: a small JSON endpoint polled every 2 s; the page is never reloaded.
function startLive(table) {
  const refresh = async () => {
    try {
      render(table, await getJSON(table.dataset.live));
    } catch (e) {
      notice(e.message, true);
    }
  };
  refresh();
  const timer = setInterval(() => (document.body.contains(table) ? refresh() : clearInterval(timer)), 2000);
}

function cells(row, values) {
  const tr = document.createElement("tr");
  values.forEach((value) => {
    const td = document.createElement("td");
    if (value instanceof Node) td.append(value);
    else td.textContent = value === null || value === undefined ? "—" : String(value);
    tr.append(td);
  });
  row.append(tr);
}

function render(table, data) {
  const body = table.querySelector("tbody");
  body.textContent = "";
  data.models.forEach((m) =>
    cells(body, [
      m.model,
      m.requests,
      m.prompt_tokens,
      m.completion_tokens,
      m.errors,
      m.mean_seconds === null ? null : m.mean_seconds.toFixed(3),
    ]),
  );
  const loaded = document.querySelector("#live-loaded tbody");
  loaded.textContent = "";
  data.loaded.forEach((l) => {
    const values = [l.model, l.fidelity];
    if (table.dataset.admin) {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = "Unload " + l.model;
      button.dataset.admin = "/admin/unload";
      button.dataset.model = l.model;
      button.addEventListener("click", onAdmin);
      values.push(button);
    }
    cells(loaded, values);
  });
  document.getElementById("live-running").textContent =
    data.running === null ? "" : "Generations running or waiting: " + data.running;
}

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("key-form");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("api-key");
    if (input.value.trim()) sessionStorage.setItem(KEY, input.value.trim());
    input.value = "";
    notice("Key kept in this tab until it closes.");
    load();
  });
  document.getElementById("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    notice("Key forgotten.");
    load();
  });
  load();
});
