// Swagger UI over this server's /docs.json, with nothing fetched from elsewhere: the online
// validator badge (an image from validator.swagger.io) is off, and images in the document's
// Markdown that live on other hosts (BentoML's default description carries badges from
// img.shields.io and others) are shown as their alt text instead of being loaded.
"use strict";

const specUrl = new URL("../docs.json", location.href).toString();
const outside = (url) => /^(https?:)?\/\//i.test(url.trim()) &&
  new URL(url.trim(), location.href).origin !== location.origin;

function localOnly(node) {
  if (typeof node === "string") {
    return node
      .replace(/!\[([^\]]*)\]\(([^)\s]*)[^)]*\)/g, (m, alt, url) => (outside(url) ? alt : m))
      .replace(/<img\b[^>]*>/gi, (m) => {
        const src = /\bsrc\s*=\s*["']?([^"'\s>]+)/i.exec(m);
        return src && outside(src[1]) ? "" : m;
      });
  }
  if (Array.isArray(node)) return node.map(localOnly);
  if (node && typeof node === "object") {
    return Object.fromEntries(Object.entries(node).map(([k, v]) => [k, localOnly(v)]));
  }
  return node;
}

async function start() {
  if (typeof SwaggerUIBundle === "undefined") {
    document.getElementById("docs-note").append(
      " (Swagger UI's files are not available on this server: read /docs.json instead.)");
    return;
  }
  const spec = localOnly(await (await fetch(specUrl)).json());
  // Relative server URLs are relative to the document, not to this page.
  spec.servers = (spec.servers || [{url: "."}]).map((s) => ({...s, url: new URL(s.url, specUrl).toString()}));
  window.ui = SwaggerUIBundle({
    spec,
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
}

window.addEventListener("load", () => start().catch((e) => {
  document.getElementById("docs-note").append(` (could not render /docs.json: ${e})`);
}));
