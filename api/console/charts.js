// Small uPlot charts: a rolling time series (the last few minutes of polled figures) and
// an x/y line (a job's loss by step). uPlot wants columns: [xs, ys1, ys2, ...].
"use strict";

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea"];
const HISTORY_S = 300;   // what a rolling chart keeps: five minutes

function chartSize(el) {
  return { width: Math.min(Math.max(el.clientWidth, 240), 900), height: 150 };
}

function seriesOf(labels, spanGaps) {
  return [{}, ...labels.map((label, i) => ({ label, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps }))];
}

class RollingChart {
  constructor(el, title, labels, formatY) {
    this.columns = [[], ...labels.map(() => [])];
    const axisY = { values: (u, ticks) => ticks.map(formatY || (v => v)), size: 60 };
    this.plot = new uPlot({ title, ...chartSize(el), series: seriesOf(labels, false),
                            axes: [{}, axisY], legend: { live: false } }, this.columns, el);
  }

  push(t, values) {
    this.columns[0].push(t);
    values.forEach((v, i) => this.columns[i + 1].push(v));
    while (this.columns[0].length && t - this.columns[0][0] > HISTORY_S) this.columns.forEach(c => c.shift());
    this.plot.setData(this.columns);
  }
}

class LineChart {
  constructor(el, title, xLabel, labels) {
    this.plot = new uPlot({ title, ...chartSize(el), series: seriesOf(labels, true),
                            scales: { x: { time: false } }, axes: [{ label: xLabel }, { size: 60 }],
                            legend: { live: false } },
                          [[], ...labels.map(() => [])], el);
  }

  show(columns) {
    this.plot.setData(columns);
  }
}
