#!/usr/bin/env bash
# Refresh the console's third-party files (crates/api/console/vendor/) from
# the npm registry at the pinned versions below, and rebuild the embedded
# basemap from Natural Earth (world-atlas). The output is committed, so
# `cargo build` needs neither node nor the network; run this only to
# upgrade a library, then update vendor/LICENSES.md and the browser tests.
set -euo pipefail
cd "$(dirname "$0")/.."
LEAFLET=leaflet@1.9.4
CLUSTER=leaflet.markercluster@1.5.3
UPLOT=uplot@1.6.32
ATLAS=world-atlas@2.0.2
TOPOJSON=topojson-client@3.1.0

out=crates/api/console/vendor
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm init -y >/dev/null && npm install --no-audit --no-fund --loglevel=error \
  "$LEAFLET" "$CLUSTER" "$UPLOT" "$ATLAS" "$TOPOJSON" >/dev/null)
m="$tmp/node_modules"
mkdir -p "$out"
# Minified builds without their source-map comments (the maps are not
# shipped, and a browser's developer tools would ask for them).
strip_map() { sed -e '/^\/\/# sourceMappingURL=/d' -e 's#//\# sourceMappingURL=[^ ]*$##' "$1" > "$2"; }
strip_map "$m/leaflet/dist/leaflet.js" "$out/leaflet.js"
cp "$m/leaflet/dist/leaflet.css" "$out/leaflet.css"
strip_map "$m/leaflet.markercluster/dist/leaflet.markercluster.js" "$out/leaflet.markercluster.js"
cat "$m/leaflet.markercluster/dist/MarkerCluster.css" "$m/leaflet.markercluster/dist/MarkerCluster.Default.css" > "$out/markercluster.css"
strip_map "$m/uplot/dist/uPlot.iife.min.js" "$out/uplot.js"
cp "$m/uplot/dist/uPlot.min.css" "$out/uplot.css"
node scripts/console-basemap.mjs "$tmp" "$out/basemap.json" 50m 0.03
ls -l "$out"
