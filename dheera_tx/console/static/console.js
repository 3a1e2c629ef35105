// dheera_tx console: live call rows. Progressive: every page works without it.
(function () {
  "use strict";
  var table = document.querySelector("table[data-live]");
  if (!table) { return; }
  var body = table.tBodies[0];
  var columns = Array.prototype.map.call(table.tHead.rows[0].cells, function (c) { return c.textContent; });
  var filters = new URLSearchParams(window.location.search);
  function newest() {
    var row = body.rows[0];
    return row ? row.getAttribute("data-id") : "";
  }
  function add(call) {
    var row = document.createElement("tr");
    row.setAttribute("data-id", call._id || "");
    columns.forEach(function (name) {
      var cell = document.createElement("td");
      var value = call[name];
      cell.textContent = value === null || value === undefined ? "\u2014" : String(value);
      row.appendChild(cell);
    });
    body.insertBefore(row, body.firstChild);
    while (body.rows.length > 200) { body.deleteRow(body.rows.length - 1); }
  }
  function poll() {
    var query = new URLSearchParams(filters);
    var after = newest();
    if (after) { query.set("after", after); }
    fetch(table.getAttribute("data-live") + "?" + query.toString(), { credentials: "same-origin" })
      .then(function (answer) { return answer.ok ? answer.json() : { calls: [] }; })
      .then(function (data) { data.calls.slice().reverse().forEach(add); })
      .catch(function () {})
      .finally(function () { window.setTimeout(poll, 1500); });
  }
  window.setTimeout(poll, 1500);
})();
