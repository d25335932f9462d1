// The vlmkit chat page: plain JavaScript over the server's OpenAI-compatible API.
//
// The whole conversation lives in `history` (OpenAI messages; each user turn carries its own
// images as image_url parts) and is sent with every question, streamed back as server-sent
// events. The assistant message element records its progress for tests and scripts:
// data-state="streaming" | "done" | "stopped" | "error" and data-chunks (content chunks received).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const els = {
    model: $("model"), modelNote: $("model-note"), newChat: $("new-chat"), apiKey: $("api-key"),
    maxTokens: $("max-tokens"), temperature: $("temperature"), heatmap: $("heatmap"), error: $("error"),
    messages: $("messages"), hint: $("empty-hint"), composer: $("composer"), previews: $("previews"),
    imageInput: $("image-input"), question: $("question"), send: $("send"), stop: $("stop"),
    overlay: $("drop-overlay"),
  };
  const MAX_IMAGE_BYTES = 8 * 2 ** 20;   // larger pictures are re-encoded smaller in the browser
  const MAX_SIDE = 2048;

  let history = [];        // [{role, content}] exactly as sent to /v1/chat/completions
  let pending = [];        // data: URLs attached to the next user turn
  let controller = null;   // AbortController of the answer being streamed
  let conversation = 0;    // bumped by "New chat", so late answers of an old chat are dropped

  // ------------------------------------------------------------------ settings
  const store = {
    get: (k) => { try { return localStorage.getItem(k); } catch { return null; } },
    set: (k, v) => { try { v ? localStorage.setItem(k, v) : localStorage.removeItem(k); } catch { /* private mode */ } },
  };
  els.apiKey.value = store.get("vlmkit.apiKey") || "";
  els.heatmap.checked = store.get("vlmkit.heatmap") === "1";
  els.apiKey.addEventListener("change", () => { store.set("vlmkit.apiKey", els.apiKey.value.trim()); loadModels(); });
  els.heatmap.addEventListener("change", () => store.set("vlmkit.heatmap", els.heatmap.checked ? "1" : ""));
  els.model.addEventListener("change", () => store.set("vlmkit.model", els.model.value));

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = els.apiKey.value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  // ------------------------------------------------------------------ errors
  function showError(message) {
    els.error.textContent = message;
    els.error.hidden = !message;
  }

  // The server answers errors as {"error": {"message", ...}}; anything else gets a plain description.
  async function errorOf(response) {
    let text = "";
    try { text = await response.text(); } catch { /* connection dropped */ }
    let message = "";
    try { message = JSON.parse(text).error.message; } catch { message = text.slice(0, 300); }
    const hint = response.status === 401 ? " Enter the server's API key under Settings." : "";
    return `${response.status} ${response.statusText || "error"}${message ? ": " + message : ""}.${hint}`;
  }

  function networkError(e) {
    return e instanceof TypeError ? "Could not reach the server (is `vlmkit serve` still running?)" : String(e.message || e);
  }

  // ------------------------------------------------------------------ models
  async function loadModels() {
    let response;
    try {
      response = await fetch("/v1/models", { headers: headers() });
    } catch (e) {
      showError(networkError(e));
      return;
    }
    if (!response.ok) {
      showError("Could not list the models: " + await errorOf(response));
      return;
    }
    const data = (await response.json()).data || [];
    // Servers that say what each model can do: keep the ones that chat. Otherwise offer them all.
    const marked = data.some((m) => Array.isArray(m.capabilities));
    const chat = marked ? data.filter((m) => (m.capabilities || []).includes("chat")) : data;
    const previous = els.model.value || store.get("vlmkit.model");
    els.model.replaceChildren(...chat.map((m) => new Option(m.id, m.id)));
    if (chat.some((m) => m.id === previous)) els.model.value = previous;
    const others = data.length - chat.length;
    els.modelNote.hidden = !others;
    els.modelNote.textContent = others ? `(${others} embedding-only model${others > 1 ? "s" : ""} not listed)` : "";
    if (!chat.length) showError("This server has no model that can chat (Stage 2 checkpoint).");
    else showError("");
    updateSend();
  }

  // ------------------------------------------------------------------ images
  function readAsDataURL(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  // Small enough pictures go as they are (byte for byte); others are redrawn as a smaller PNG.
  async function toDataURL(file) {
    const url = await readAsDataURL(file);
    if (file.size <= MAX_IMAGE_BYTES && /^data:image\/(png|jpeg|gif|webp|bmp);/.test(url)) return url;
    const img = new Image();
    img.src = url;
    await img.decode();
    const scale = Math.min(1, MAX_SIDE / Math.max(img.naturalWidth, img.naturalHeight));
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(img.naturalWidth * scale));
    canvas.height = Math.max(1, Math.round(img.naturalHeight * scale));
    canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
    return canvas.toDataURL("image/png");
  }

  async function attach(files) {
    const images = [...files].filter((f) => f.type.startsWith("image/"));
    if (files.length && !images.length) {
      showError("That is not an image file.");
      return;
    }
    for (const file of images) {
      try {
        pending.push(await toDataURL(file));
      } catch {
        showError(`Could not read ${file.name || "the image"}.`);
      }
    }
    renderPreviews();
  }

  function renderPreviews() {
    els.previews.replaceChildren(...pending.map((url, i) => {
      const item = document.createElement("div");
      item.className = "preview";
      const img = document.createElement("img");
      img.src = url;
      img.alt = `Attached image ${i + 1}`;
      img.id = i === 0 ? "image-preview" : "";
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "remove";
      remove.textContent = "×";
      remove.setAttribute("aria-label", `Remove attached image ${i + 1}`);
      remove.addEventListener("click", () => { pending.splice(i, 1); renderPreviews(); els.question.focus(); });
      item.append(img, remove);
      return item;
    }));
    updateSend();
  }

  els.imageInput.addEventListener("change", async () => {
    await attach(els.imageInput.files);
    els.imageInput.value = "";   // choosing the same file again still fires "change"
    els.question.focus();
  });

  document.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData?.files || [])].filter((f) => f.type.startsWith("image/"));
    if (files.length) {
      e.preventDefault();
      attach(files);
    }
  });

  let dragDepth = 0;
  const dragsFiles = (e) => [...(e.dataTransfer?.types || [])].includes("Files");
  document.addEventListener("dragenter", (e) => { if (dragsFiles(e)) { dragDepth++; els.overlay.hidden = false; } });
  document.addEventListener("dragleave", () => { if (dragDepth && --dragDepth === 0) els.overlay.hidden = true; });
  document.addEventListener("dragover", (e) => { if (dragsFiles(e)) e.preventDefault(); });
  document.addEventListener("drop", (e) => {
    if (!dragsFiles(e)) return;
    e.preventDefault();
    dragDepth = 0;
    els.overlay.hidden = true;
    attach(e.dataTransfer.files);
  });

  // ------------------------------------------------------------------ messages
  function addMessage(role, text, images = []) {
    els.hint.hidden = true;
    const box = document.createElement("article");
    box.className = `message ${role}`;
    box.dataset.role = role;
    const who = document.createElement("h2");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Assistant";
    box.append(who);
    if (images.length) {
      const row = document.createElement("div");
      row.className = "images";
      images.forEach((url, i) => {
        const img = document.createElement("img");
        img.src = url;
        img.alt = `Your image ${i + 1}`;
        row.append(img);
      });
      box.append(row);
    }
    const content = document.createElement("div");
    content.className = "content";
    content.textContent = text;
    box.append(content);
    els.messages.append(box);
    box.scrollIntoView({ block: "end" });
    return box;
  }

  function setState(box, state, note = "") {
    box.dataset.state = state;
    box.setAttribute("aria-busy", state === "streaming" ? "true" : "false");
    if (note) {
      const p = document.createElement("p");
      p.className = state === "error" ? "error" : "note";
      p.textContent = note;
      box.append(p);
    }
  }

  // ------------------------------------------------------------------ sending
  function busy() { return controller !== null; }

  function updateSend() {
    els.send.disabled = busy() || !els.model.value || !els.question.value.trim();
    els.send.hidden = busy();
    els.stop.hidden = !busy();
  }

  els.question.addEventListener("input", () => {
    updateSend();
    els.question.style.height = "auto";
    els.question.style.height = Math.min(els.question.scrollHeight, 200) + "px";
  });

  els.question.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      if (!els.send.disabled) els.composer.requestSubmit();
    }
  });

  els.composer.addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });

  els.stop.addEventListener("click", () => controller?.abort());

  els.newChat.addEventListener("click", () => {
    controller?.abort();
    conversation++;
    history = [];
    pending = [];
    renderPreviews();
    els.messages.replaceChildren(els.hint);
    els.hint.hidden = false;
    showError("");
    els.question.value = "";
    els.question.dispatchEvent(new Event("input"));
    els.question.focus();
  });

  function numberOr(input, fallback) {
    const v = Number(input.value);
    return input.value !== "" && Number.isFinite(v) ? v : fallback;
  }

  async function send() {
    const question = els.question.value.trim();
    if (!question || busy() || !els.model.value) return;
    showError("");
    const images = pending;
    const turn = {
      role: "user",
      content: [...images.map((url) => ({ type: "image_url", image_url: { url } })), { type: "text", text: question }],
    };
    history.push(turn);
    pending = [];
    renderPreviews();
    els.question.value = "";
    els.question.dispatchEvent(new Event("input"));
    addMessage("user", question, images);

    const box = addMessage("assistant", "");
    const content = box.querySelector(".content");
    box.dataset.chunks = "0";
    setState(box, "streaming");
    const model = els.model.value;
    const body = {
      model, messages: history, stream: true,
      max_tokens: Math.max(1, Math.round(numberOr(els.maxTokens, 256))),
      temperature: Math.min(2, Math.max(0, numberOr(els.temperature, 0))),
    };
    const mine = conversation;
    controller = new AbortController();
    updateSend();
    let answer = "";
    let failure = "";
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
      });
      if (!response.ok) throw new Error(await errorOf(response));
      for await (const event of sse(response)) {
        if (event.error) throw new Error(event.error.message || "the server reported an error");
        const piece = event.choices?.[0]?.delta?.content;
        if (piece) {
          answer += piece;
          content.textContent = answer;
          box.dataset.chunks = String(Number(box.dataset.chunks) + 1);
          box.scrollIntoView({ block: "end" });
        }
      }
    } catch (e) {
      failure = e.name === "AbortError" ? "stopped" : networkError(e);
    } finally {
      controller = null;
      updateSend();
    }
    if (mine !== conversation) return;   // "New chat" was pressed meanwhile

    if (failure === "stopped") {
      setState(box, "stopped", "Stopped.");
      if (answer) history.push({ role: "assistant", content: answer });
      else history.pop();
    } else if (failure) {
      // Take the turn back so the question can be sent again as it was.
      history.pop();
      setState(box, "error", failure);
      box.previousElementSibling?.classList.add("failed");
      if (!els.question.value) {
        els.question.value = question;
        els.question.dispatchEvent(new Event("input"));
      }
      if (!pending.length) { pending = images; renderPreviews(); }
    } else {
      history.push({ role: "assistant", content: answer });
      setState(box, "done");
      if (!answer) content.textContent = "(empty answer)";
      if (els.heatmap.checked) explain(box, model, question, answer, images, mine);
    }
    els.question.focus();
  }

  // Yields the JSON objects of a server-sent event stream, ending at "data: [DONE]".
  async function* sse(response) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const lines = buffer.split(/\r?\n/);
      buffer = lines.pop();
      for (const line of lines) {
        if (!line.startsWith("data:")) continue;   // blank separators, comments, other fields
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        try {
          yield JSON.parse(data);
        } catch {
          throw new Error("the server sent something that is not JSON: " + data.slice(0, 200));
        }
      }
    }
    throw new Error("the answer stream ended early (the server stopped or the connection dropped)");
  }

  // ------------------------------------------------------------------ attention heatmap
  function lastImage(upTo) {
    for (let i = upTo.length - 1; i >= 0; i--) {
      const parts = Array.isArray(upTo[i].content) ? upTo[i].content : [];
      const urls = parts.filter((p) => p.type === "image_url").map((p) => p.image_url.url);
      if (urls.length) return urls[urls.length - 1];
    }
    return null;
  }

  async function explain(box, model, question, answer, images, mine) {
    const image = images.length ? images[images.length - 1] : lastImage(history);
    if (!answer.trim()) return;
    if (!image) {
      setState(box, "done", "No heatmap: this conversation has no image.");
      return;
    }
    const figure = document.createElement("figure");
    figure.className = "heatmap";
    figure.dataset.state = "loading";
    const caption = document.createElement("figcaption");
    caption.textContent = "Computing the attention heatmap…";
    figure.append(caption);
    box.append(figure);
    try {
      const response = await fetch("/v1/vlmkit/explain", {
        method: "POST", headers: headers(), body: JSON.stringify({ model, image, question, answer }),
      });
      if (!response.ok) throw new Error(await errorOf(response));
      const result = await response.json();
      if (mine !== conversation) return;
      const img = document.createElement("img");
      img.src = result.image;
      img.alt = `Where each word of the answer looked in the image (attention heatmap)`;
      caption.textContent = "Attention of the answer over the image";
      figure.prepend(img);
      figure.dataset.state = "done";
    } catch (e) {
      caption.textContent = "No heatmap: " + networkError(e);
      caption.className = "error";
      figure.dataset.state = "error";
    }
  }

  // For scripts and debugging: the conversation as it will be sent next.
  window.vlmkitChat = { get history() { return structuredClone(history); } };

  updateSend();
  loadModels();
  els.question.focus();
})();
