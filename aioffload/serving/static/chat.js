// The chat playground: /v1/chat/completions streamed over SSE; Stop aborts the fetch, and the
// server aborts a request whose client went away, so its KV blocks return at the next step.

import { AuthError, apiFetch, errorMessage, sseEvents } from "./api.js";

export function setupChat({ onAuthError }) {
  const form = document.getElementById("chat-form");
  const prompt = document.getElementById("prompt");
  const messages = document.getElementById("messages");
  const send = document.getElementById("send");
  const stop = document.getElementById("stop");
  const history = [];  // {role, content} of finished turns
  let controller = null;

  function bubble(role, text) {
    const div = document.createElement("div");
    div.className = `message ${role}`;
    div.textContent = text;
    messages.append(div);
    messages.scrollTop = messages.scrollHeight;
    return div;
  }

  function settings() {
    const temperature = Number(document.getElementById("temperature").value);
    const maxTokens = Number(document.getElementById("max-tokens").value);
    if (!(temperature >= 0 && temperature <= 2)) throw new Error("temperature must be between 0 and 2");
    if (!(Number.isInteger(maxTokens) && maxTokens >= 1)) throw new Error("max tokens must be an integer >= 1");
    return { temperature, max_tokens: maxTokens, ignore_eos: document.getElementById("ignore-eos").checked };
  }

  async function run(text) {
    const reply = bubble("assistant", "");
    reply.dataset.chunks = "0";
    reply.dataset.state = "streaming";
    let content = "";
    controller = new AbortController();
    send.disabled = true;
    stop.disabled = false;
    try {
      const body = { messages: [...history, { role: "user", content: text }], stream: true,
                     stream_options: { include_usage: true }, ...settings() };
      const response = await apiFetch("/v1/chat/completions", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body), signal: controller.signal,
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      const started = performance.now();
      for await (const chunk of sseEvents(response)) {
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          content += delta.content;
          reply.textContent = content;
          reply.dataset.chunks = String(Number(reply.dataset.chunks) + 1);
          messages.scrollTop = messages.scrollHeight;
        }
        if (chunk.usage) {
          const s = (performance.now() - started) / 1e3;
          const rate = s > 0 ? ` in ${s.toFixed(1)} s, ${(chunk.usage.completion_tokens / s).toFixed(1)} tok/s` : "";
          bubble("meta", `${chunk.usage.completion_tokens} tokens${rate}`);
        }
      }
      reply.dataset.state = "done";
      history.push({ role: "user", content: text }, { role: "assistant", content });
    } catch (e) {
      if (e.name === "AbortError") {
        reply.dataset.state = "stopped";
        bubble("meta", "stopped");
        if (content) history.push({ role: "user", content: text }, { role: "assistant", content });
      } else {
        reply.dataset.state = "error";
        bubble("error", e.message);
        if (e instanceof AuthError) onAuthError();
      }
    } finally {
      controller = null;
      send.disabled = false;
      stop.disabled = true;
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = prompt.value.trim();
    if (!text || controller) return;
    prompt.value = "";
    bubble("user", text);
    run(text);
  });
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  stop.addEventListener("click", () => controller && controller.abort());
  document.getElementById("clear").addEventListener("click", () => {
    if (controller) controller.abort();
    history.length = 0;
    messages.replaceChildren();
  });
}
