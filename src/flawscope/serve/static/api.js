// flawscope pages: requests to the service with the API key, when the service has keys.
// The key is asked for once (on the first 401) and kept for this browser tab only
// (sessionStorage); 403 says which role the key lacks.
"use strict";

const flawscopeApi = (() => {
  const STORE = "flawscope-api-key";
  let asking = null;

  function keyDialog(message) {
    let dialog = document.querySelector("#key-dialog");
    if (!dialog) {
      dialog = document.createElement("dialog");
      dialog.id = "key-dialog";
      dialog.className = "zoom key-dialog";
      dialog.setAttribute("aria-labelledby", "key-title");
      dialog.innerHTML = `
        <form method="dialog" class="zoom-body">
          <h2 id="key-title" class="zoom-title">API key</h2>
          <p class="key-message"></p>
          <label class="key-label">Key <input id="key-input" type="password"
            autocomplete="off" spellcheck="false" required></label>
          <div class="zoom-head">
            <button class="button" value="cancel" type="button" id="key-cancel">Cancel</button>
            <button class="button primary" value="ok" id="key-ok">Use key</button>
          </div>
        </form>`;
      document.body.append(dialog);
      dialog.querySelector("#key-cancel").addEventListener("click", () => dialog.close(""));
    }
    dialog.querySelector(".key-message").textContent = message;
    const input = dialog.querySelector("#key-input");
    input.value = "";
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => {
        resolve(dialog.returnValue === "ok" ? input.value.trim() : "");
      }, { once: true });
      dialog.showModal();
      input.focus();
    });
  }

  async function ask(message) {
    if (!asking) {
      asking = keyDialog(message).then((key) => {
        asking = null;
        if (key) sessionStorage.setItem(STORE, key);
        return key;
      });
    }
    return asking;
  }

  // fetch() with the key; on 401 the key is asked for and the request sent again
  async function apiFetch(url, options = {}, retries = 3) {
    const headers = new Headers(options.headers || {});
    const key = sessionStorage.getItem(STORE);
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const r = await fetch(url, { ...options, headers });
    if (r.status === 401 && retries > 0) {
      let detail = "This service needs an API key.";
      try { detail = (await r.clone().json()).detail || detail; } catch (_) { /* not JSON */ }
      sessionStorage.removeItem(STORE);
      const given = await ask(`${detail}. Enter your key:`);
      if (given) return apiFetch(url, options, retries - 1);
    }
    return r;
  }

  // an image endpoint as an object URL (an <img src> cannot send the key)
  async function imageUrl(url) {
    const r = await apiFetch(url);
    if (!r.ok) return null;
    return URL.createObjectURL(await r.blob());
  }

  return { apiFetch, imageUrl, forget: () => sessionStorage.removeItem(STORE) };
})();
