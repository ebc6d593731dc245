// Small behaviour shared by every page (htmx does the rest: see the htmx-config meta tag in base.html).
(function () {
  "use strict";
  function flash(text) {
    var el = document.getElementById("flash");
    if (!el) return;
    el.className = "flash error";
    el.setAttribute("role", "alert");
    el.textContent = text;
  }
  // The server could not be reached (an error answer is swapped into #flash by htmx itself).
  document.body.addEventListener("htmx:sendError", function () { flash("the registry did not answer; retrying"); });
})();
