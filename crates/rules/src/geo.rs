//! Geofencing for trackers: great-circle distance and point-in-polygon.
//!
//! Polygons are written in WKT with longitude first, as GIS tools export
//! them: `'POLYGON((lon lat, lon lat, …), (hole…))'`. They are parsed and
//! validated when the rule is created (a bad polygon refuses the rule), and
//! a bounding box rejects far-away points before the ray-casting test.
//! Edges are straight lines in longitude/latitude, which is what fences a
//! few kilometres wide need; polygons crossing the antimeridian are not
//! supported.

/// Mean Earth radius (IUGG), metres.
const EARTH_RADIUS_M: f64 = 6_371_008.8;

/// Haversine distance in metres between two latitude/longitude points (degrees).
pub(crate) fn distance_m(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = (lat2 - lat1).to_radians();
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_M * a.sqrt().min(1.0).asin()
}

/// A polygon with optional holes, points as (lon, lat).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Polygon {
    rings: Vec<Vec<(f64, f64)>>,
    min: (f64, f64),
    max: (f64, f64),
}

impl Polygon {
    /// Parse `POLYGON((lon lat, …)[, (…)])`. Rings are closed if the last
    /// point does not repeat the first.
    pub(crate) fn parse_wkt(text: &str) -> Result<Polygon, String> {
        let t = text.trim();
        let head = t.get(..7).unwrap_or("");
        if !head.eq_ignore_ascii_case("POLYGON") {
            return Err("expected `POLYGON((lon lat, lon lat, ...))`".into());
        }
        let body = t[7..].trim();
        let body = body
            .strip_prefix('(')
            .and_then(|b| b.strip_suffix(')'))
            .ok_or("expected `POLYGON((...))` with outer parentheses")?;
        let mut rings = Vec::new();
        let mut rest = body.trim();
        while !rest.is_empty() {
            let inner = rest
                .strip_prefix('(')
                .ok_or("each ring must be in parentheses: `(lon lat, ...)`")?;
            let close = inner.find(')').ok_or("unclosed ring")?;
            rings.push(parse_ring(&inner[..close])?);
            rest = inner[close + 1..].trim_start();
            if let Some(r) = rest.strip_prefix(',') {
                rest = r.trim_start();
                if rest.is_empty() {
                    return Err("trailing comma after a ring".into());
                }
            } else if !rest.is_empty() {
                return Err(format!("unexpected `{rest}` after a ring"));
            }
        }
        if rings.is_empty() {
            return Err("no ring".into());
        }
        let mut min = (f64::INFINITY, f64::INFINITY);
        let mut max = (f64::NEG_INFINITY, f64::NEG_INFINITY);
        for &(x, y) in &rings[0] {
            min = (min.0.min(x), min.1.min(y));
            max = (max.0.max(x), max.1.max(y));
        }
        Ok(Polygon { rings, min, max })
    }

    /// Even-odd ray casting over all rings (a point in a hole is outside).
    pub(crate) fn contains(&self, lat: f64, lon: f64) -> bool {
        let (x, y) = (lon, lat);
        if !(x >= self.min.0 && x <= self.max.0 && y >= self.min.1 && y <= self.max.1) {
            return false;
        }
        let mut inside = false;
        for ring in &self.rings {
            let mut j = ring.len() - 1;
            for i in 0..ring.len() {
                let (xi, yi) = ring[i];
                let (xj, yj) = ring[j];
                if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
                    inside = !inside;
                }
                j = i;
            }
        }
        inside
    }
}

fn parse_ring(text: &str) -> Result<Vec<(f64, f64)>, String> {
    let mut points = Vec::new();
    for pair in text.split(',') {
        let mut it = pair.split_whitespace();
        let (Some(lon), Some(lat), None) = (it.next(), it.next(), it.next()) else {
            return Err(format!("`{}` is not a `lon lat` pair", pair.trim()));
        };
        let lon: f64 = lon
            .parse()
            .map_err(|_| format!("`{lon}` is not a longitude"))?;
        let lat: f64 = lat
            .parse()
            .map_err(|_| format!("`{lat}` is not a latitude"))?;
        if !(-180.0..=180.0).contains(&lon) {
            return Err(format!(
                "longitude {lon} out of range (points are `lon lat`)"
            ));
        }
        if !(-90.0..=90.0).contains(&lat) {
            return Err(format!(
                "latitude {lat} out of range (points are `lon lat`)"
            ));
        }
        points.push((lon, lat));
    }
    if points.len() > 1 && points.first() == points.last() {
        points.pop();
    }
    if points.len() < 3 {
        return Err("a ring needs at least 3 distinct points".into());
    }
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn haversine() {
        // Paris (Notre-Dame) to London (Big Ben): about 343 km.
        let d = distance_m(48.8530, 2.3499, 51.5007, -0.1246);
        assert!((d - 343_000.0).abs() < 1_000.0, "{d}");
        assert_eq!(distance_m(10.0, 20.0, 10.0, 20.0), 0.0);
        // One degree of latitude: about 111.2 km.
        let d = distance_m(0.0, 0.0, 1.0, 0.0);
        assert!((d - 111_195.0).abs() < 10.0, "{d}");
    }

    #[test]
    fn square_with_hole() {
        let p = Polygon::parse_wkt("POLYGON((0 0, 10 0, 10 10, 0 10, 0 0), (4 4, 6 4, 6 6, 4 6))")
            .expect("polygon");
        assert!(p.contains(1.0, 1.0));
        assert!(p.contains(9.0, 2.0));
        assert!(!p.contains(5.0, 5.0), "in the hole");
        assert!(!p.contains(11.0, 5.0));
        assert!(!p.contains(-1.0, 5.0));
    }

    #[test]
    fn refusals() {
        for bad in [
            "",
            "POINT(1 2)",
            "POLYGON(0 0, 1 1, 1 0)",
            "POLYGON((0 0, 1 1))",
            "POLYGON((0 0, 1, 1 0))",
            "POLYGON((0 0, 1 1, 1 x))",
            "POLYGON((0 0, 200 1, 1 0))",
            "POLYGON((0 0, 1 95, 1 0))",
            "POLYGON((0 0, 1 1, 1 0),)",
            "POLYGON((0 0, 1 1, 1 0)",
        ] {
            assert!(Polygon::parse_wkt(bad).is_err(), "{bad}");
        }
    }
}
