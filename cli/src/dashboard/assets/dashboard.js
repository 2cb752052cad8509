// BizQ dashboard: live refresh. Pages whose <main> carries data-refresh="N" reload their
// content every N seconds in place (same URL, same credentials), pausing while the tab is
// hidden. No other script runs on the pages; the CSP allows only this file.
(function () {
  "use strict";
  var main = document.getElementById("content");
  if (!main || !main.dataset.refresh) { return; }
  var every = Math.max(2, parseInt(main.dataset.refresh, 10) || 5) * 1000;
  function refresh() {
    if (document.hidden) { return; }
    fetch(window.location.href, { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (text) {
        if (!text) { return; }
        var doc = new DOMParser().parseFromString(text, "text/html");
        var fresh = doc.getElementById("content");
        if (fresh) { main.replaceChildren.apply(main, Array.from(fresh.childNodes)); }
      })
      .catch(function () { /* the next tick tries again */ });
  }
  window.setInterval(refresh, every);
})();
