// The page: polls /v1/dashboard about once a second (?poll_ms=N changes that, for replays),
// feeds the placement map and the charts, and runs the chat.

import { AuthError, apiFetch, apiKey, errorMessage, setApiKey } from "./api.js";
import { Charts } from "./charts.js";
import { setupChat } from "./chat.js";
import { renderPlacement } from "./placement.js";

const params = new URLSearchParams(location.search);
const POLL_MS = Math.max(10, Number(params.get("poll_ms")) || 1000);

const status = document.getElementById("status");
const keyForm = document.getElementById("key-form");
const keyInput = document.getElementById("api-key");
const charts = new Charts(document.getElementById("chart-grid"));
let since = null;  // the last step number seen; null until the first snapshot (which carries the placement)
let timer = null;
let waitingForKey = false;
let polls = 0;

function setStatus(state, text) {
  status.dataset.state = state;
  status.textContent = text;
}

function askForKey(message) {
  keyForm.hidden = false;
  setStatus("auth", message || "this server needs an API key");
  keyInput.focus();
}

function summarize(snap) {
  document.getElementById("model").textContent = snap.model;
  document.getElementById("summary").textContent =
    `running ${snap.num_running} · waiting ${snap.num_waiting} · steps ${snap.steps_total}`;
}

async function poll() {
  timer = null;
  try {
    const response = await apiFetch(since === null ? "/v1/dashboard" : `/v1/dashboard?since=${since}`);
    if (!response.ok) {
      setStatus(response.status === 503 ? "loading" : "error", await errorMessage(response));
    } else {
      const snap = await response.json();
      if (snap.placement) renderPlacement(snap.placement);
      since = snap.steps_total;
      charts.add(snap);
      if (!document.hidden) charts.draw();
      summarize(snap);
      polls += 1;
      document.body.dataset.polls = String(polls);
      setStatus("ok", "live");
    }
  } catch (e) {
    if (e instanceof AuthError) {
      askForKey(apiKey() ? "the API key was refused" : "this server needs an API key");
      waitingForKey = true;
      return;  // resumes when a key is given
    }
    setStatus("offline", "server unreachable");
  }
  schedule();
}

function schedule() {
  if (timer === null) timer = setTimeout(poll, POLL_MS);
}

keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  setApiKey(keyInput.value.trim());
  keyForm.hidden = true;
  setStatus("connecting", "connecting");
  if (waitingForKey) {
    waitingForKey = false;
    poll();
  }
});
document.addEventListener("visibilitychange", () => !document.hidden && charts.draw());

setupChat({ onAuthError: () => askForKey("the API key was refused") });
const keyRequired = document.querySelector('meta[name="aioffload-api-key"]').content === "required";
if (keyRequired && !apiKey()) {
  askForKey("this server needs an API key");
  waitingForKey = true;
} else {
  poll();
}
