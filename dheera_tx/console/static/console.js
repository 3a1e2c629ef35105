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

// The spend chart (uPlot, vendored): spend per day, total and the top five.
(function () {
  "use strict";
  var holder = document.getElementById("spend-chart");
  if (!holder || typeof uPlot === "undefined") { return; }
  var colors = ["#1d2330", "#2457c5", "#1e7a3c", "#b3261e", "#8a5cc2", "#c98a0b"];
  fetch(holder.getAttribute("data-source"), { credentials: "same-origin" })
    .then(function (answer) { return answer.json(); })
    .then(function (data) {
      var x = data.days.map(function (day) { return Date.parse(day + "T00:00:00Z") / 1000; });
      var series = [{}, { label: "total (USD)", stroke: colors[0], width: 2 }];
      var values = [x, data.total];
      Object.keys(data.series).forEach(function (name, i) {
        series.push({ label: name.length > 24 ? name.slice(0, 12) + "\u2026" : name, stroke: colors[(i + 1) % colors.length] });
        values.push(data.series[name]);
      });
      holder.setAttribute("data-drawn", "true");
      new uPlot({ width: Math.min(1100, holder.clientWidth || 900), height: 260, series: series,
                  axes: [{}, { size: 90, values: function (u, ticks) { return ticks.map(function (v) { return "$" + v.toPrecision(3); }); } }] },
                values, holder);
    })
    .catch(function () {});
})();
