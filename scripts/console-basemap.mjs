// Build the console's embedded basemap (crates/api/console/vendor/basemap.json)
// from Natural Earth's land and country polygons as the npm package
// `world-atlas` ships them (TopoJSON), with `topojson-client`. Run by
// scripts/console-vendor.sh, which installs both into a temporary folder
// and passes it as the first argument.
//
// Output: one GeoJSON FeatureCollection of two features, `land` (a
// MultiPolygon: the coastlines are its outline) and `borders` (a
// MultiLineString of the boundaries between countries, each drawn once).
// Lines are simplified (Douglas-Peucker) and coordinates rounded to STEP
// degrees (default 0.03°, about 3 km: the detail a basemap of last resort
// needs up to a country's zoom), repeated points dropped: Natural Earth 50m
// comes to about half a megabyte.
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { createRequire } from "node:module";

const [modules, out, scale = "50m", stepArg = "0.03"] = process.argv.slice(2);
const require = createRequire(join(modules, "noop.js"));
const topojson = require("topojson-client");
const atlas = (name) => JSON.parse(readFileSync(join(modules, "node_modules/world-atlas", name), "utf8"));

const STEP = Number(stepArg);
const round = (v) => Math.round(v / STEP) * STEP;
const fix = (v) => Number(round(v).toFixed(2));
// Douglas-Peucker: drop points closer than TOLERANCE to the line through
// their neighbours (a coastline's detail below a few kilometres).
function simplify(pts, tol) {
  if (pts.length < 3) return pts;
  const keep = new Uint8Array(pts.length);
  keep[0] = keep[pts.length - 1] = 1;
  const stack = [[0, pts.length - 1]];
  while (stack.length) {
    const [a, b] = stack.pop();
    const [ax, ay] = pts[a], [bx, by] = pts[b];
    const dx = bx - ax, dy = by - ay, len = Math.hypot(dx, dy);
    let worst = -1, at = -1;
    for (let i = a + 1; i < b; i++) {
      const [px, py] = pts[i];
      const d = len ? Math.abs(dy * px - dx * py + bx * ay - by * ax) / len : Math.hypot(px - ax, py - ay);
      if (d > worst) { worst = d; at = i; }
    }
    if (worst > tol) { keep[at] = 1; stack.push([a, at], [at, b]); }
  }
  return pts.filter((_, i) => keep[i]);
}

function line(coords, closed) {
  const outCoords = [];
  for (const [x, y] of simplify(coords, STEP)) {
    const p = [fix(x), fix(y)];
    const last = outCoords[outCoords.length - 1];
    if (!last || last[0] !== p[0] || last[1] !== p[1]) outCoords.push(p);
  }
  if (closed && outCoords.length < 4) return null;
  if (!closed && outCoords.length < 2) return null;
  return outCoords;
}

const land = topojson.feature(atlas(`land-${scale}.json`), atlas(`land-${scale}.json`).objects.land);
const polygons = [];
for (const f of land.features || [land]) {
  const g = f.geometry;
  const polys = g.type === "Polygon" ? [g.coordinates] : g.coordinates;
  for (const poly of polys) {
    const rings = poly.map((r) => line(r, true)).filter(Boolean);
    if (rings.length) polygons.push(rings);
  }
}
const countries = atlas(`countries-${scale}.json`);
const mesh = topojson.mesh(countries, countries.objects.countries, (a, b) => a !== b);
const borders = mesh.coordinates.map((l) => line(l, false)).filter(Boolean);

const doc = {
  type: "FeatureCollection",
  features: [
    { type: "Feature", properties: { layer: "land" }, geometry: { type: "MultiPolygon", coordinates: polygons } },
    { type: "Feature", properties: { layer: "borders" }, geometry: { type: "MultiLineString", coordinates: borders } },
  ],
};
const text = JSON.stringify(doc);
writeFileSync(out, text + "\n");
console.log(`${out}: ${text.length} bytes (${polygons.length} land polygons, ${borders.length} border lines)`);
