// The chat page: the conversation lives here and is sent whole with every round (the OpenAI protocol is
// stateless); the server reuses the cached prefix, so earlier rounds and images are not recomputed.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), question = $("question"), attachments = $("attachments"), statusLine = $("status");
let model = null;
let messages = [];      // OpenAI messages of the rounds answered so far
let pending = [];       // images for the next message: {name, url}
let imagesShown = 0;    // images already in the conversation (numbering continues across rounds)
let inFlight = null;    // AbortController of the running request

function setStatus(text) { statusLine.textContent = text; }

// A number typed into a settings field, or undefined (left out: the server's default).
function setting(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

function figure(url, caption) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.src = url;
  img.alt = caption;
  const cap = document.createElement("figcaption");
  cap.textContent = caption;
  fig.append(img, cap);
  return fig;
}

function renderAttachments() {
  attachments.replaceChildren(...pending.map((im, i) => {
    const fig = figure(im.url, `image ${imagesShown + i + 1}`);
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.title = `remove ${im.name}`;
    remove.onclick = () => { pending.splice(i, 1); renderAttachments(); };
    fig.append(remove);
    return fig;
  }));
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function addFiles(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) { setStatus(`${file.name || "item"} is not an image`); continue; }
    pending.push({ name: file.name || "pasted image", url: await readAsDataURL(file) });
  }
  renderAttachments();
}

function bubble(role, text, images = []) {
  $("hint")?.remove();
  const div = document.createElement("div");
  div.className = `message ${role}`;
  if (images.length) {
    const row = document.createElement("div");
    row.className = "images";
    row.append(...images.map((im) => figure(im.url, `image ${im.number}`)));
    div.append(row);
  }
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  div.append(body);
  log.append(div);
  log.scrollTop = log.scrollHeight;
  return { div, body };
}

// Server-sent events from a fetch body: calls onData with each "data:" payload.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ") && onData(line.slice(6)) === false) return;
      }
    }
  }
}

async function errorMessage(response) {
  try { return (await response.json()).error.message; } catch { return `HTTP ${response.status}`; }
}

async function send(event) {
  event.preventDefault();
  const text = question.value.trim();
  if (inFlight) return;
  if (!text) { setStatus("type a question (images are sent with it)"); return; }
  const images = pending.map((im, i) => ({ ...im, number: imagesShown + i + 1 }));
  const user = { role: "user", content: [
    ...images.map((im) => ({ type: "image_url", image_url: { url: im.url } })),
    { type: "text", text },
  ] };
  const asked = bubble("user", text, images);
  const answer = bubble("assistant streaming", "");
  const controller = new AbortController();
  inFlight = controller;
  $("send").disabled = true;
  setStatus("thinking…");
  let failure = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, signal: controller.signal,
      body: JSON.stringify({ model, messages: [...messages, user], stream: true,
                             max_tokens: setting("max-tokens"), temperature: setting("temperature") }),
    });
    if (!response.ok) {
      failure = await errorMessage(response);
    } else {
      await readEvents(response, (data) => {
        if (data === "[DONE]") return false;
        const chunk = JSON.parse(data);
        if (chunk.error) { failure = chunk.error.message; return false; }
        const delta = chunk.choices[0]?.delta?.content;
        if (!delta) return;
        if (Array.isArray(delta)) {  // an image the model drew: a chunk with image parts (docs/serve.md)
          for (const part of delta) {
            const img = document.createElement("img");
            img.src = part.image_url.url;
            img.alt = "image drawn by the model";
            answer.body.append(img);
          }
        } else {
          answer.body.append(delta);
        }
        log.scrollTop = log.scrollHeight;
      });
    }
  } catch (e) {
    failure = controller.signal.aborted ? null : String(e);
  }
  if (inFlight !== controller) return;  // a new conversation started meanwhile
  inFlight = null;
  $("send").disabled = false;
  answer.div.classList.remove("streaming");
  if (failure !== null) {
    // Nothing is lost: the question and its images stay in the composer for another try.
    asked.div.classList.add("unsent");
    answer.div.classList.add("error");
    answer.body.textContent = failure;
    setStatus("not sent: fix the problem and send again");
    return;
  }
  answer.div.classList.add("done");
  messages.push(user, { role: "assistant", content: answer.body.textContent });
  imagesShown += images.length;
  pending = [];
  renderAttachments();
  question.value = "";
  setStatus("");
}

function newConversation() {
  inFlight?.abort();
  inFlight = null;
  messages = [];
  pending = [];
  imagesShown = 0;
  log.replaceChildren();
  renderAttachments();
  question.value = "";
  $("send").disabled = false;
  setStatus("new conversation");
}

$("composer").addEventListener("submit", send);
$("new-conversation").addEventListener("click", newConversation);
$("image-input").addEventListener("change", async (e) => { await addFiles(e.target.files); e.target.value = ""; });
question.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
document.addEventListener("paste", (e) => {
  const files = [...e.clipboardData.items].filter((it) => it.kind === "file").map((it) => it.getAsFile());
  if (files.length) { e.preventDefault(); addFiles(files); }
});
const composer = $("composer");
composer.addEventListener("dragover", (e) => { e.preventDefault(); composer.classList.add("dragging"); });
composer.addEventListener("dragleave", () => composer.classList.remove("dragging"));
composer.addEventListener("drop", (e) => {
  e.preventDefault();
  composer.classList.remove("dragging");
  addFiles(e.dataTransfer.files);
});

fetch("/v1/models").then((r) => r.json()).then((list) => {
  model = list.data[0].id;
  $("model").textContent = model;
}).catch(() => setStatus("cannot reach the server"));
