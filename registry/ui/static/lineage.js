// The lineage graph of a version page, drawn by cytoscape.js with the dagre layout (vendored).
// Elements come from the page (#lineage-data, built by the server from the lineage service); edges run
// parent -> child, so dagre ranks ancestors above descendants. Every node is a link to its version.
(function () {
  "use strict";
  var data = document.getElementById("lineage-data");
  var box = document.getElementById("lineage-graph");
  if (!data || !box || typeof cytoscape === "undefined") return;
  cytoscape.use(cytoscapeDagre);
  var colour = {
    adapter_of: "#2563eb", finetune_of: "#7c3aed", merge_of: "#d97706",
    transfer_of: "#059669", basis_member_of: "#db2777", plan_member_of: "#0891b2", quantized_of: "#6b7280"
  };
  // A node is as large as its label (two lines: ref, then kind and status).
  function size(which) {
    return function (node) {
      var lines = String(node.data("label")).split("\n");
      if (which === "height") return lines.length * 14;
      return Math.max.apply(null, lines.map(function (l) { return l.length; })) * 6.6;
    };
  }
  var cy = cytoscape({
    container: box,
    elements: JSON.parse(data.textContent),
    boxSelectionEnabled: false,
    autoungrabify: true,
    style: [
      { selector: "node", style: {
          "shape": "round-rectangle", "background-color": "#f8fafc", "border-width": 1, "border-color": "#94a3b8",
          "label": "data(label)", "text-wrap": "wrap", "text-valign": "center", "text-halign": "center",
          "font-size": 11, "font-family": "system-ui, sans-serif", "color": "#0f172a",
          "width": size("width"), "height": size("height"), "padding": "8px" } },
      { selector: "node[kind = 'base']", style: { "background-color": "#e0f2fe" } },
      { selector: "node[kind = 'adapter']", style: { "background-color": "#eef2ff" } },
      { selector: "node[kind = 'merge']", style: { "background-color": "#fef3c7" } },
      { selector: "node[status = 'candidate']", style: { "border-style": "dashed", "border-color": "#059669" } },
      { selector: "node[?archived]", style: { "opacity": 0.5 } },
      { selector: "node[?root]", style: { "border-width": 3, "border-color": "#0f172a" } },
      { selector: "edge", style: {
          "width": 1.5, "curve-style": "bezier", "target-arrow-shape": "triangle",
          "line-color": "#94a3b8", "target-arrow-color": "#94a3b8",
          "label": "data(label)", "font-size": 9, "text-rotation": "autorotate",
          "text-background-color": "#ffffff", "text-background-opacity": 0.85, "text-background-padding": "2px" } }
    ].concat(Object.keys(colour).map(function (r) {
      return { selector: "edge[relation = '" + r + "']",
               style: { "line-color": colour[r], "target-arrow-color": colour[r], "color": colour[r] } };
    })).concat([{ selector: "edge[relation = 'transfer_of'], edge[relation = 'basis_member_of'], edge[relation = 'plan_member_of']",
                  style: { "line-style": "dashed" } }])
  });
  var layout = cy.layout({ name: "dagre", rankDir: "TB", nodeSep: 40, rankSep: 90, edgeSep: 10, fit: true, padding: 20 });
  layout.one("layoutstop", function () { box.dataset.ready = "true"; });
  layout.run();
  cy.on("tap", "node", function (evt) { window.location.href = evt.target.data("url"); });
  cy.on("mouseover", "node", function () { box.style.cursor = "pointer"; });
  cy.on("mouseout", "node", function () { box.style.cursor = ""; });
  window.registryLineage = cy;  // for people poking at the page, and for the browser tests
})();
