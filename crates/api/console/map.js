// The fleet map, drawn by Leaflet (the global `L` from
// /console/vendor/leaflet.js) with Leaflet.markercluster.
//
// Layers, bottom to top: the embedded basemap (Natural Earth land and
// borders, /console/vendor/basemap.json, in a pane of its own under the
// tiles), the tile server's tiles when `console.tile_url` is set and
// reachable (they cover the basemap where they load; where they cannot —
// no internet — the basemap shows through, so the map is never blank), the
// rules' geofences, a device's track, and the devices themselves,
// clustered. Colours of the basemap, fences and track come from the
// stylesheet (classes `bm-land`, `bm-border`, `fence`, `track`), so they
// follow the theme.

let basemapData = null;

/// Leaflet's tile layer, but for how it cancels a tile still loading (on a
/// zoom change) or drops one: Leaflet points the image at a `data:` GIF,
/// which the console's Content-Security-Policy refuses (img-src is our
/// origin and the tile server only) and reports as an error. Removing the
/// `src` attribute cancels the load just as well. The rest is Leaflet
/// 1.9.4's `_abortLoading` and `_removeTile` (vendor/leaflet.js), unchanged.
let CspTileLayer = null;
function tileLayer(url, options) {
  if (!CspTileLayer) {
    CspTileLayer = L.TileLayer.extend({
      _abortLoading() {
        for (const key in this._tiles) {
          const t = this._tiles[key];
          if (t.coords.z === this._tileZoom) continue;
          const tile = t.el;
          tile.onload = L.Util.falseFn;
          tile.onerror = L.Util.falseFn;
          if (!tile.complete) {
            tile.removeAttribute("src");
            L.DomUtil.remove(tile);
            delete this._tiles[key];
            this.fire("tileabort", { tile, coords: t.coords });
          }
        }
      },
      _removeTile(key) {
        const t = this._tiles[key];
        if (!t) return undefined;
        t.el.removeAttribute("src");
        return L.GridLayer.prototype._removeTile.call(this, key);
      },
    });
  }
  return new CspTileLayer(url, options);
}

/// The embedded basemap (fetched once per page load; it is ~0.5 MB).
async function basemap() {
  if (!basemapData) {
    const r = await fetch("/console/vendor/basemap.json");
    if (!r.ok) throw new Error("basemap: HTTP " + r.status);
    basemapData = await r.json();
  }
  return basemapData;
}

/// A Leaflet map in `box`, with the basemap and (if configured) tiles.
/// `config`: the answer of `GET /api/v1/console/config`.
export async function createMap(box, config) {
  const map = L.map(box, { worldCopyJump: true, minZoom: 2, maxZoom: 18, zoomSnap: 0.5 });
  map.setView([30, 10], 2);
  map.createPane("basemap");
  map.getPane("basemap").style.zIndex = 150; // under tilePane (200)
  map.attributionControl.setPrefix(false);
  map.attributionControl.addAttribution("Basemap: Natural Earth");
  const data = await basemap();
  L.geoJSON(data, {
    pane: "basemap",
    interactive: false,
    style: (f) => ({ className: f.properties.layer === "land" ? "bm-land" : "bm-border" }),
  }).addTo(map);
  if (config && config.tile_url) {
    const tiles = tileLayer(config.tile_url, {
      attribution: config.tile_attribution || "",
      maxZoom: 19,
      // A tile that fails stays empty (the basemap shows through it)
      // instead of the broken-image icon.
      errorTileUrl: "",
    });
    let failed = 0;
    tiles.on("tileerror", () => {
      failed += 1;
      box.dataset.tilesFailed = String(failed);
    });
    tiles.addTo(map);
  }
  return map;
}

/// The devices as clustered markers. `onOpen(id)` when one is chosen
/// (click, or Enter on the focused marker).
export function fleetLayer(map, onOpen) {
  const group = L.markerClusterGroup({
    chunkedLoading: true,
    showCoverageOnHover: false,
    maxClusterRadius: 50,
    spiderfyOnMaxZoom: true,
  });
  map.addLayer(group);
  const markers = new Map(); // id → marker
  const icon = L.divIcon({ className: "pin", iconSize: [12, 12] });
  const pending = new Map(); // id → [lat, lon], applied in one batch
  let timer = null;
  const flush = () => {
    timer = null;
    const fresh = [], moved = [];
    for (const [id, ll] of pending) {
      const m = markers.get(id);
      if (!m) {
        const nm = L.marker(ll, { icon, title: id, alt: id, keyboard: true, riseOnHover: true });
        nm.deviceId = id;
        nm.on("click", () => onOpen(id));
        markers.set(id, nm);
        fresh.push(nm);
      } else {
        const cur = m.getLatLng();
        if (Math.abs(cur.lat - ll[0]) > 1e-7 || Math.abs(cur.lng - ll[1]) > 1e-7) { moved.push([m, ll]); }
      }
    }
    pending.clear();
    // Moved markers leave and re-enter the clusters in two bulk
    // operations (markercluster re-clusters a bulk change once), not one
    // re-clustering per device: a fleet of thousands moving every second
    // stays smooth.
    if (moved.length) {
      group.removeLayers(moved.map(([m]) => m));
      for (const [m, ll] of moved) m.setLatLng(ll);
      group.addLayers(moved.map(([m]) => m));
    }
    if (fresh.length) group.addLayers(fresh);
  };
  return {
    group,
    /// Set devices' positions: `[{ id, lat, lon }]`.
    update(list) {
      for (const p of list) pending.set(p.id, [p.lat, p.lon]);
      if (!timer) timer = setTimeout(flush, 50);
    },
    /// Apply pending changes now (before fitting the view to them).
    flush() { clearTimeout(timer); flush(); },
    count: () => markers.size,
    bounds() {
      const b = L.latLngBounds([]);
      for (const m of markers.values()) b.extend(m.getLatLng());
      return b;
    },
    ids: () => [...markers.keys()].sort(),
  };
}

/// The geofences of the rules: `[{ rule, ring: [[lon, lat], …] }]`.
export function fenceLayer(map, fences) {
  const layer = L.layerGroup(fences.map((f) =>
    L.polygon(f.ring.map(([lon, lat]) => [lat, lon]), { className: "fence", interactive: true })
      .bindTooltip("Geofence of rule " + f.rule))).addTo(map);
  return layer;
}

/// Drawing a new geofence: while on, each click on the map adds a corner;
/// `ring()` is the corners as `[[lon, lat], …]` (closed), `clear()`
/// starts over. The outline is drawn as it grows.
export function fenceDrawer(map) {
  let on = false;
  const corners = [];
  // Made at the first corner: no empty shape on the map before.
  let outline = null;
  map.on("click", (e) => {
    if (!on) return;
    corners.push([e.latlng.lat, e.latlng.lng]);
    if (!outline) outline = L.polygon([], { className: "fence-draft", interactive: false }).addTo(map);
    outline.setLatLngs(corners);
  });
  return {
    setOn: (v) => { on = v; map.getContainer().classList.toggle("drawing", v); },
    count: () => corners.length,
    ring: () => corners.length ? [...corners, corners[0]].map(([lat, lon]) => [lon, lat]) : [],
    clear: () => { corners.length = 0; if (outline) { outline.remove(); outline = null; } },
  };
}

/// A device's path, `points` = `[[ts_ms, lat, lon], …]` oldest first, with
/// a marker that replays it: `seek(i)` puts the marker at the i-th point.
export function trackLayer(map, id, points) {
  const line = L.polyline(points.map((p) => [p[1], p[2]]), { className: "track", interactive: false }).addTo(map);
  const head = L.marker([points[0][1], points[0][2]], {
    icon: L.divIcon({ className: "pin replay", iconSize: [16, 16] }),
    title: id + " (replay)", keyboard: false, zIndexOffset: 1000,
  }).addTo(map);
  map.fitBounds(line.getBounds(), { padding: [30, 30], maxZoom: 15 });
  return {
    seek(i) {
      const p = points[Math.max(0, Math.min(points.length - 1, i))];
      head.setLatLng([p[1], p[2]]);
    },
    remove() { line.remove(); head.remove(); },
  };
}
