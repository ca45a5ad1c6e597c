// weightstream serve's page. The chat streams from /v1/chat/completions (fetch + a reader over the
// server-sent events); the figures come from /v1/stats, polled twice a second.
"use strict";
const $ = (id) => document.getElementById(id);
const history = [];  // {role, content}: the conversation sent with each request
let controller = null;  // aborts the running request (Stop): the server cancels the generation

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

// Read an SSE body: yields each `data:` payload (events are separated by a blank line).
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const out = addMessage("assistant streaming", "");
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  let reply = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        messages: history, stream: true,
        max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value),
      }),
      signal: controller.signal,
    });
    if (!response.ok) {
      const body = await response.json();
      throw new Error(`${response.status}: ${body.error ? body.error.message : JSON.stringify(body)}`);
    }
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices.length ? chunk.choices[0].delta : {};
      if (delta.content) {
        reply += delta.content;
        out.textContent = reply;
        $("log").scrollTop = $("log").scrollHeight;
      }
    }
    history.push({ role: "assistant", content: reply });
  } catch (e) {
    if (e.name === "AbortError") {
      history.push({ role: "assistant", content: reply });
    } else {
      out.className = "msg error";
      out.textContent = reply + (reply ? "\n" : "") + "error: " + e.message;
      history.pop();  // the question that failed is not kept
    }
  } finally {
    out.classList.remove("streaming");
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

const pct = (x) => (x == null ? "–" : (100 * x).toFixed(1) + "%");
const num = (x, digits) => (x == null ? "–" : x.toFixed(digits));

function drawLayers(perLayer) {
  const box = $("layers");
  const layers = Object.keys(perLayer || {});
  if (!layers.length) return;  // keep the last bars (or the note) until a generation has figures
  box.replaceChildren(...layers.map((layer) => {
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.height = Math.max(1, 100 * perLayer[layer]) + "%";
    bar.title = `layer ${layer}: ${pct(perLayer[layer])}`;
    bar.dataset.layer = layer;
    if (layers.length <= 32 || layer % 4 === 0) {
      const label = document.createElement("span");
      label.textContent = layer;
      bar.appendChild(label);
    }
    return bar;
  }));
}

async function poll() {
  try {
    const s = await (await fetch("/v1/stats")).json();
    $("model").textContent = `${s.model} (context ${s.n_ctx})`;
    if (s.memory && s.memory.budget) $("memory").textContent = `memory budget ${(s.memory.budget / 2 ** 20).toFixed(0)} MiB`;
    $("f-state").textContent = s.generating ? "generating" : "idle";
    $("f-tps").textContent = num(s.tokens_per_second, 1);
    $("f-ttft").textContent = s.time_to_first_token_s == null ? "–" : (1000 * s.time_to_first_token_s).toFixed(0) + " ms";
    $("f-queue").textContent = s.queue_depth;
    // expert figures only where experts stream, and once a generation has asked for some
    const g = s.experts && s.generation && Object.keys(s.generation.hit_rate_per_layer).length ? s.generation : null;
    $("f-hit").textContent = g ? pct(g.hit_rate) : "–";
    $("f-stall").textContent = g ? num(g.stall_ms_per_token, 2) : "–";
    $("f-bpt").textContent = g ? num(g.bytes_per_token / 2 ** 20, 2) : "–";
    $("f-gbps").textContent = g ? num(g.read_gbps_wall, 2) : "–";
    $("f-total").textContent = `${s.generated_tokens_total} tokens, ${s.generations} generations done` +
      (s.experts ? `, hit rate ${pct(s.experts.hit_rate)}` : "");
    if (g) drawLayers(g.hit_rate_per_layer);
    $("updated").textContent = new Date(1000 * s.time).toLocaleTimeString();
  } catch (e) {
    $("updated").textContent = "server unreachable";
  }
}

$("ask").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("ask").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => { history.length = 0; $("log").replaceChildren(); });
poll();
setInterval(poll, 500);
