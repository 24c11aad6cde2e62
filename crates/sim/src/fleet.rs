//! Simulated device fleets: machines that behave like real ones.
//!
//! The model has two halves. A [`Machine`] is a pure signal generator: given
//! its profile, a seed and the wall-clock time of each reading it produces
//! the next JSON reading, with all randomness drawn from its own seeded
//! generator — so the same seed and the same timestamps give the same
//! readings, and tests step it without sockets or sleeps. Profiles:
//! a factory machine (temperature following load with a lag, vibration, rpm,
//! occasional overheating faults), an electricity meter (a daily load curve
//! with morning and evening peaks; the energy counter only grows), a truck
//! (driving around a closed loop of waypoints, burning fuel), a wearable
//! (heart rate by activity and time of day, steps, battery) and a soil probe
//! (moisture drying out until it rains, a daily temperature cycle). The
//! time of day is UTC.
//!
//! [`run`] is the driver: one task per device connects over real MQTT with
//! its credentials (client id = username = device id, password = token),
//! subscribes to `devices/{id}/commands` and its shadow's delta (applied
//! and reported back; missed ones are asked for with `get` on connecting),
//! publishes a reading on
//! `devices/{id}/telemetry` every interval (each device with its own random
//! phase), answers every command on `devices/{id}/commands/response` (MQTT 5
//! correlation data copied) and reconnects with a back-off when the
//! connection drops. A `diagnostics.upload` command is answered once the
//! device has PUT a small bundle to the URL it names ([`crate::diagnostics`]).
//! A `shutdown` command stops the machine — a factory
//! machine or a meter keeps reporting, with its values dropped to idle; a
//! truck, wearable or soil probe goes silent — until a `start` command.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use mqtt_codec::{Packet, Protocol, PubResponse, Publish, PublishProperties, QoS};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::client::{ClientConfig, Conn};
use crate::BenchError;

const DAY_MS: i64 = 86_400_000;

/// A kind of simulated device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    Factory,
    Meter,
    Truck,
    Wearable,
    Soil,
}

impl Profile {
    pub const ALL: [Profile; 5] = [
        Profile::Factory,
        Profile::Meter,
        Profile::Truck,
        Profile::Wearable,
        Profile::Soil,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Profile::Factory => "factory",
            Profile::Meter => "meter",
            Profile::Truck => "truck",
            Profile::Wearable => "wearable",
            Profile::Soil => "soil",
        }
    }

    /// The metrics every reading of this profile carries.
    pub fn metrics(self) -> &'static [&'static str] {
        match self {
            Profile::Factory => &["temperature", "vibration", "rpm", "load", "fault"],
            Profile::Meter => &["power_kw", "energy_kwh", "voltage"],
            Profile::Truck => &["lat", "lon", "speed_kmh", "fuel_pct", "odometer_km"],
            Profile::Wearable => &["heart_rate", "steps", "battery"],
            Profile::Soil => &["moisture", "temperature", "battery"],
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown profile name.
#[derive(Debug, thiserror::Error)]
#[error("unknown profile {0:?} (factory, meter, truck, wearable or soil)")]
pub struct UnknownProfile(pub String);

impl FromStr for Profile {
    type Err = UnknownProfile;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Profile::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| UnknownProfile(s.to_string()))
    }
}

/// SplitMix64: tiny, fast and good enough for simulated noise; seeded so
/// runs are reproducible.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The generator of device `index` in a run seeded with `seed`.
    pub fn for_device(seed: u64, index: u64, stream: u64) -> Rng {
        let mut r = Rng(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (stream << 56));
        r.next_u64();
        r
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Roughly normal, mean 0, standard deviation 1 (sum of uniforms),
    /// bounded to ±6 so no reading ever leaves its range by bad luck.
    pub fn gauss(&mut self) -> f64 {
        (0..12).map(|_| self.unit()).sum::<f64>() - 6.0
    }

    /// `true` with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

/// Hour of the (UTC) day, 0.0 ..< 24.0.
pub fn hour_of_day(now_ms: i64) -> f64 {
    now_ms.rem_euclid(DAY_MS) as f64 / 3_600_000.0
}

fn bump(h: f64, center: f64, width: f64) -> f64 {
    let d = (h - center).abs().min(24.0 - (h - center).abs());
    (-(d * d) / (2.0 * width * width)).exp()
}

/// A household's relative power demand over the day: low at night, a
/// morning peak around 07:30, a smaller midday plateau and the evening peak
/// around 19:30. About 0.25 at 03:00, about 1.3 at 19:30.
pub fn daily_load(hour: f64) -> f64 {
    0.25 + 0.6 * bump(hour, 7.5, 1.5) + 0.3 * bump(hour, 13.0, 3.0) + 1.05 * bump(hour, 19.5, 2.0)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// A truck's closed route: waypoints (lat, lon) driven in order, back to
/// the first.
#[derive(Debug, Clone)]
pub struct Route {
    pub waypoints: Vec<(f64, f64)>,
    /// Cumulative length in km at the start of each segment, then the total.
    offsets: Vec<f64>,
}

impl Route {
    pub fn new(waypoints: Vec<(f64, f64)>) -> Route {
        let n = waypoints.len();
        let mut offsets = Vec::with_capacity(n + 1);
        let mut total = 0.0;
        for i in 0..n {
            offsets.push(total);
            total += distance_km(waypoints[i], waypoints[(i + 1) % n]);
        }
        offsets.push(total);
        Route { waypoints, offsets }
    }

    /// A jittered polygon of `n` waypoints around `center`.
    fn around(rng: &mut Rng, center: (f64, f64), radius_deg: f64, n: usize) -> Route {
        let points = (0..n)
            .map(|i| {
                let a = std::f64::consts::TAU * i as f64 / n as f64;
                let r = radius_deg * rng.range(0.7, 1.0);
                (center.0 + r * a.sin(), center.1 + r * a.cos() * 1.5)
            })
            .collect();
        Route::new(points)
    }

    pub fn length_km(&self) -> f64 {
        *self.offsets.last().unwrap_or(&0.0)
    }

    /// The point `km` along the loop (wrapping) and the segment it lies on.
    pub fn position(&self, km: f64) -> ((f64, f64), usize) {
        let n = self.waypoints.len();
        let total = self.length_km();
        if n == 0 || total <= 0.0 {
            return (self.waypoints.first().copied().unwrap_or((0.0, 0.0)), 0);
        }
        let d = km.rem_euclid(total);
        let seg = (0..n).rfind(|&i| self.offsets[i] <= d).unwrap_or(0);
        let len = self.offsets[seg + 1] - self.offsets[seg];
        let f = if len > 0.0 {
            (d - self.offsets[seg]) / len
        } else {
            0.0
        };
        let (a, b) = (self.waypoints[seg], self.waypoints[(seg + 1) % n]);
        ((a.0 + (b.0 - a.0) * f, a.1 + (b.1 - a.1) * f), seg)
    }
}

/// Equirectangular approximation: plenty for a few km.
fn distance_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    let lat = ((a.0 + b.0) / 2.0).to_radians();
    let dx = (b.1 - a.1).to_radians() * lat.cos();
    let dy = (b.0 - a.0).to_radians();
    6371.0 * (dx * dx + dy * dy).sqrt()
}

#[derive(Debug, Clone)]
enum State {
    Factory {
        ambient: f64,
        temperature: f64,
        load: f64,
        load_target: f64,
        /// Seconds of overheating fault left.
        fault_left: f64,
    },
    Meter {
        size: f64,
        energy_kwh: f64,
    },
    Truck {
        route: Route,
        km: f64,
        speed_kmh: f64,
        cruise_kmh: f64,
        /// Seconds of standing still left (deliveries, traffic lights).
        stop_left: f64,
        fuel_pct: f64,
        odometer_km: f64,
    },
    Wearable {
        resting_hr: f64,
        heart_rate: f64,
        /// 0 rest, 1 walking, 2 running.
        activity: u8,
        steps: f64,
        day: i64,
        battery: f64,
    },
    Soil {
        moisture: f64,
        battery: f64,
    },
}

/// What a command did to a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandOutcome {
    Done,
    Unknown,
}

/// One simulated device's signals. Deterministic: the readings depend only
/// on the seed, the device index and the timestamps passed in.
#[derive(Debug, Clone)]
pub struct Machine {
    pub profile: Profile,
    running: bool,
    rng: Rng,
    last_ms: Option<i64>,
    state: State,
}

impl Machine {
    pub fn new(profile: Profile, seed: u64, index: u64) -> Machine {
        let mut rng = Rng::for_device(seed, index, 1);
        let state = match profile {
            Profile::Factory => {
                let ambient = rng.range(18.0, 26.0);
                let load = rng.range(0.4, 0.8);
                State::Factory {
                    ambient,
                    temperature: ambient + 45.0 * load,
                    load,
                    load_target: load,
                    fault_left: 0.0,
                }
            }
            Profile::Meter => State::Meter {
                size: rng.range(0.7, 1.5),
                energy_kwh: rng.range(1_000.0, 20_000.0),
            },
            Profile::Truck => {
                // Depots scattered around Munich.
                let center = (48.137 + rng.range(-0.3, 0.3), 11.575 + rng.range(-0.4, 0.4));
                let radius = rng.range(0.03, 0.1);
                let route = Route::around(&mut rng, center, radius, 8);
                let km = rng.range(0.0, route.length_km());
                State::Truck {
                    route,
                    km,
                    speed_kmh: 0.0,
                    cruise_kmh: rng.range(55.0, 85.0),
                    stop_left: 0.0,
                    fuel_pct: rng.range(40.0, 100.0),
                    odometer_km: rng.range(10_000.0, 400_000.0),
                }
            }
            Profile::Wearable => {
                let resting_hr = rng.range(55.0, 75.0);
                State::Wearable {
                    resting_hr,
                    heart_rate: resting_hr,
                    activity: 0,
                    steps: 0.0,
                    day: -1,
                    battery: rng.range(30.0, 100.0),
                }
            }
            Profile::Soil => State::Soil {
                moisture: rng.range(20.0, 40.0),
                battery: rng.range(60.0, 100.0),
            },
        };
        Machine {
            profile,
            running: true,
            rng,
            last_ms: None,
            state,
        }
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Apply a command by name: `shutdown` stops the machine, `start`
    /// starts it again.
    pub fn command(&mut self, name: &str) -> CommandOutcome {
        match name {
            "shutdown" | "stop" => {
                self.running = false;
                CommandOutcome::Done
            }
            "start" => {
                self.running = true;
                CommandOutcome::Done
            }
            _ => CommandOutcome::Unknown,
        }
    }

    /// Advance to `now_ms` (Unix milliseconds) and return the reading to
    /// publish, if the device publishes one.
    pub fn reading(&mut self, now_ms: i64) -> Option<Value> {
        let dt = match self.last_ms {
            Some(last) => ((now_ms - last) as f64 / 1000.0).clamp(0.0, 3600.0),
            None => 0.0,
        };
        self.last_ms = Some(now_ms);
        let hour = hour_of_day(now_ms);
        let running = self.running;
        let rng = &mut self.rng;
        let mut m = Map::new();
        fn put(m: &mut Map<String, Value>, k: &str, v: f64) {
            m.insert(k.into(), json!(round2(v)));
        }
        match &mut self.state {
            State::Factory {
                ambient,
                temperature,
                load,
                load_target,
                fault_left,
            } => {
                if running {
                    // A new job now and then: the load heads somewhere else.
                    if rng.chance((dt / 300.0).min(1.0)) {
                        *load_target = rng.range(0.3, 1.0);
                    }
                    *load +=
                        (*load_target - *load) * (1.0 - (-dt / 60.0).exp()) + 0.01 * rng.gauss();
                    *load = load.clamp(0.2, 1.0);
                    // Roughly one overheating episode per machine and hour.
                    if *fault_left <= 0.0 && rng.chance((dt / 3600.0).min(1.0)) {
                        *fault_left = rng.range(60.0, 180.0);
                    }
                } else {
                    *load = 0.0;
                    *fault_left = 0.0;
                }
                let fault = *fault_left > 0.0;
                *fault_left = (*fault_left - dt).max(0.0);
                let target = *ambient + 45.0 * *load + if fault { 45.0 } else { 0.0 };
                // Thermal mass: a lag of about two minutes (faster when failing).
                let tau = if fault { 30.0 } else { 120.0 };
                *temperature += (target - *temperature) * (1.0 - (-dt / tau).exp());
                let temp = (*temperature + 0.2 * rng.gauss()).clamp(0.0, 150.0);
                let (rpm, vibration) = if running {
                    let rpm = 1_500.0 * *load + 10.0 * rng.gauss();
                    let vib = 1.0 + 3.0 * *load + 0.2 * rng.gauss() + if fault { 5.0 } else { 0.0 };
                    (rpm.clamp(0.0, 1_800.0), vib.clamp(0.0, 15.0))
                } else {
                    (0.0, (0.05 + 0.01 * rng.gauss()).max(0.0))
                };
                put(&mut m, "temperature", temp);
                put(&mut m, "vibration", vibration);
                put(&mut m, "rpm", rpm);
                put(&mut m, "load", *load);
                m.insert("fault".into(), json!(fault));
            }
            State::Meter { size, energy_kwh } => {
                let power = if running {
                    (*size * daily_load(hour) * (1.0 + 0.05 * rng.gauss())).max(0.05)
                } else {
                    0.0
                };
                *energy_kwh += power * dt / 3600.0;
                put(&mut m, "power_kw", power);
                put(&mut m, "energy_kwh", *energy_kwh);
                put(&mut m, "voltage", 230.0 + 1.5 * rng.gauss());
            }
            State::Truck {
                route,
                km,
                speed_kmh,
                cruise_kmh,
                stop_left,
                fuel_pct,
                odometer_km,
            } => {
                if !running {
                    *speed_kmh = 0.0;
                    return None;
                }
                if *stop_left > 0.0 {
                    *stop_left -= dt;
                    *speed_kmh = 0.0;
                } else {
                    // A stop about every 15 minutes of driving.
                    if rng.chance((dt / 900.0).min(1.0)) {
                        *stop_left = rng.range(30.0, 300.0);
                    }
                    let target = *cruise_kmh + 8.0 * rng.gauss();
                    *speed_kmh += (target - *speed_kmh) * (1.0 - (-dt / 20.0).exp());
                    *speed_kmh = speed_kmh.clamp(0.0, 110.0);
                }
                let step = *speed_kmh * dt / 3600.0;
                *km = (*km + step).rem_euclid(route.length_km().max(f64::MIN_POSITIVE));
                *odometer_km += step;
                // 30 l/100 km from a 400 l tank; refuelled below 10 %.
                *fuel_pct -= step * 0.075;
                if *fuel_pct < 10.0 {
                    *fuel_pct = 100.0;
                }
                let ((lat, lon), _) = route.position(*km);
                m.insert("lat".into(), json!((lat * 1e6).round() / 1e6));
                m.insert("lon".into(), json!((lon * 1e6).round() / 1e6));
                put(&mut m, "speed_kmh", *speed_kmh);
                put(&mut m, "fuel_pct", *fuel_pct);
                put(&mut m, "odometer_km", *odometer_km);
            }
            State::Wearable {
                resting_hr,
                heart_rate,
                activity,
                steps,
                day,
                battery,
            } => {
                if !running {
                    return None;
                }
                let today = now_ms.div_euclid(DAY_MS);
                if today != *day {
                    *day = today;
                    *steps = 0.0;
                }
                let awake = (7.0..22.5).contains(&hour);
                if rng.chance((dt / 600.0).min(1.0)) {
                    let r = rng.unit();
                    *activity = if !awake || r < 0.6 {
                        0
                    } else if r < 0.93 {
                        1
                    } else {
                        2
                    };
                }
                if !awake {
                    *activity = 0;
                }
                let (target, cadence) = match activity {
                    0 if !awake => (*resting_hr - 8.0, 0.0),
                    0 => (*resting_hr + 5.0, 0.0),
                    1 => (*resting_hr + 30.0, 100.0),
                    _ => (*resting_hr + 85.0, 160.0),
                };
                *heart_rate += (target - *heart_rate) * (1.0 - (-dt / 30.0).exp());
                *steps += cadence * dt / 60.0;
                // About three days per charge; charged overnight when low.
                *battery -= dt / (3.0 * 864.0);
                if *battery < 5.0 {
                    *battery = 100.0;
                }
                put(
                    &mut m,
                    "heart_rate",
                    (*heart_rate + 2.0 * rng.gauss()).clamp(35.0, 200.0).round(),
                );
                put(&mut m, "steps", steps.floor());
                put(&mut m, "battery", battery.max(0.0));
            }
            State::Soil { moisture, battery } => {
                if !running {
                    return None;
                }
                // Drying, faster in the afternoon sun; rain when it gets dry.
                let sun = bump(hour, 14.0, 4.0);
                *moisture -= dt / 3600.0 * (0.05 + 0.25 * sun);
                if *moisture < 12.0 || rng.chance((dt / (3.0 * 86_400.0)).min(1.0)) {
                    *moisture = (*moisture + rng.range(15.0, 30.0)).min(45.0);
                }
                *battery = (*battery - dt / (365.0 * 864.0)).max(0.0);
                let temperature = 12.0
                    + 6.0 * (std::f64::consts::TAU * (hour - 9.0) / 24.0).sin()
                    + 0.2 * rng.gauss();
                put(&mut m, "moisture", moisture.clamp(0.0, 60.0));
                put(&mut m, "temperature", temperature);
                put(&mut m, "battery", *battery);
            }
        }
        Some(Value::Object(m))
    }
}

/// One provisioned device's MQTT credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCredential {
    pub device_id: String,
    pub token: String,
}

/// How to run a fleet.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Broker address, HOST:PORT.
    pub host: String,
    pub profile: Profile,
    /// Reporting interval of every device.
    pub interval: Duration,
    pub seed: u64,
    pub protocol: Protocol,
    /// How devices take part in OTA firmware jobs.
    pub ota: crate::ota::OtaOptions,
}

/// Live counters of a running fleet, for progress lines.
#[derive(Debug, Default)]
pub struct FleetStats {
    pub connected: AtomicU64,
    pub published: AtomicU64,
    pub commands: AtomicU64,
    /// Desired-state changes applied and reported back.
    pub shadow_reports: AtomicU64,
    /// Firmware images installed (reported `succeeded` after the reboot).
    pub ota_installed: AtomicU64,
    /// Firmware jobs reported `failed`.
    pub ota_failed: AtomicU64,
    /// Downloads cut and resumed with `Range`.
    pub ota_resumed: AtomicU64,
    pub connection_errors: AtomicU64,
    last_error: RwLock<Option<String>>,
}

impl FleetStats {
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn error(&self, e: &BenchError) {
        self.connection_errors.fetch_add(1, Ordering::Relaxed);
        *self
            .last_error
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(e.to_string());
    }
}

/// Totals of a finished run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetReport {
    pub published: u64,
    pub commands: u64,
    pub connection_errors: u64,
}

/// Drive `devices` until `stop` turns `true` (or its sender is dropped).
pub async fn run(
    devices: Vec<DeviceCredential>,
    opts: FleetOptions,
    stats: Arc<FleetStats>,
    stop: watch::Receiver<bool>,
) -> FleetReport {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, dev) in devices.into_iter().enumerate() {
        let opts = opts.clone();
        let stats = stats.clone();
        let stop = stop.clone();
        tasks.spawn(async move { drive(dev, i as u64, &opts, &stats, stop).await });
    }
    while tasks.join_next().await.is_some() {}
    FleetReport {
        published: stats.published.load(Ordering::Relaxed),
        commands: stats.commands.load(Ordering::Relaxed),
        connection_errors: stats.connection_errors.load(Ordering::Relaxed),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    // A dropped sender means stop, too.
    let _ = stop.wait_for(|s| *s).await;
}

/// One device: connect, run, reconnect with back-off, until stopped.
async fn drive(
    dev: DeviceCredential,
    index: u64,
    opts: &FleetOptions,
    stats: &FleetStats,
    mut stop: watch::Receiver<bool>,
) {
    let mut machine = Machine::new(opts.profile, opts.seed, index);
    let mut phase_rng = Rng::for_device(opts.seed, index, 2);
    let phase = opts.interval.mul_f64(phase_rng.unit());
    let cfg = ClientConfig {
        host: opts.host.clone(),
        client_id: dev.device_id.clone(),
        protocol: opts.protocol,
        keep_alive: 60,
        clean_start: true,
        username: Some(dev.device_id.clone()),
        password: Some(dev.token.clone()),
        tls: None,
        local_ip: None,
    };
    let mut backoff = Duration::from_millis(500);
    let mut firmware = Firmware {
        version: "1.0.0".into(),
        rebooted_into: None,
        rng: Rng::for_device(opts.seed, index, 3),
    };
    loop {
        let outcome = tokio::select! {
            _ = stopped(&mut stop) => return,
            r = session(&cfg, &dev.device_id, phase, opts, &mut machine, &mut firmware, stats) => r,
        };
        match outcome {
            // A reboot into new firmware: back at once.
            Ok(()) => {
                backoff = Duration::from_millis(500);
                continue;
            }
            Err(e) => stats.error(&e),
        }
        let wait = backoff.mul_f64(phase_rng.range(0.5, 1.5));
        backoff = (backoff * 2).min(Duration::from_secs(30));
        tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Decrements the connected gauge when a session ends, however it ends.
struct Connected<'a>(&'a FleetStats);

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.0.connected.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A device's firmware, across reconnects.
struct Firmware {
    version: String,
    /// A job installed before the last reboot, to report as succeeded.
    rebooted_into: Option<String>,
    rng: Rng,
}

/// Queue a QoS 1 publish of `payload` to `topic`.
fn queue_pub(conn: &mut Conn, topic: &str, payload: Vec<u8>) -> Result<(), BenchError> {
    let pid = conn.next_packet_id();
    conn.queue(&Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: topic.to_string(),
        packet_id: Some(pid),
        properties: Default::default(),
        payload: Bytes::from(payload),
    }))
}

/// Do a firmware job: download, verify, install. `Ok(true)`: installed,
/// reboot now; `Ok(false)`: reported failed (or nothing to do).
async fn do_job(
    conn: &mut Conn,
    id: &str,
    job: &crate::ota::JobSpec,
    opts: &crate::ota::OtaOptions,
    fw: &mut Firmware,
    stats: &FleetStats,
) -> Result<bool, BenchError> {
    use crate::ota;
    let topic = format!("devices/{id}/ota/status");
    if job.version == fw.version {
        // Already running it (the job came again after the reboot).
        queue_pub(
            conn,
            &topic,
            ota::status(&job.job_id, "succeeded", None, None, Some(&fw.version)),
        )?;
        conn.flush().await?;
        return Ok(false);
    }
    let fail = |conn: &mut Conn, reason: &str| {
        stats.ota_failed.fetch_add(1, Ordering::Relaxed);
        queue_pub(
            conn,
            &topic,
            ota::status(&job.job_id, "failed", None, Some(reason), None),
        )
    };
    queue_pub(
        conn,
        &topic,
        ota::status(&job.job_id, "downloading", Some(0), None, None),
    )?;
    conn.flush().await?;
    let cut = fw.rng.chance(opts.interrupt_rate).then_some(job.size / 2);
    let d = match ota::download(&job.url, job.size, cut).await {
        Ok(d) => d,
        Err(e) => {
            fail(conn, &format!("download failed: {e}"))?;
            conn.flush().await?;
            return Ok(false);
        }
    };
    if d.resumed {
        stats.ota_resumed.fetch_add(1, Ordering::Relaxed);
    }
    queue_pub(
        conn,
        &topic,
        ota::status(&job.job_id, "verifying", Some(100), None, None),
    )?;
    if let Err(e) = ota::verify(job, &d, opts.public_key.as_deref()) {
        fail(conn, &e)?;
        conn.flush().await?;
        return Ok(false);
    }
    queue_pub(
        conn,
        &topic,
        ota::status(&job.job_id, "installing", Some(100), None, None),
    )?;
    if fw.rng.chance(opts.failure_rate) {
        fail(conn, "simulated install failure: flash write error")?;
        conn.flush().await?;
        return Ok(false);
    }
    conn.flush().await?;
    fw.version = job.version.clone();
    fw.rebooted_into = Some(job.job_id.clone());
    Ok(true)
}

/// One connection's life: returns with the error that ended it, or `Ok`
/// to reboot into new firmware.
async fn session(
    cfg: &ClientConfig,
    id: &str,
    phase: Duration,
    opts: &FleetOptions,
    machine: &mut Machine,
    fw: &mut Firmware,
    stats: &FleetStats,
) -> Result<(), BenchError> {
    let interval = opts.interval;
    let mut conn = Conn::connect(cfg).await?;
    stats.connected.fetch_add(1, Ordering::Relaxed);
    let _gauge = Connected(stats);
    // Firmware jobs: after a reboot into new firmware, say so; then ask
    // for any job waiting.
    let job_topic = format!("devices/{id}/ota/job");
    conn.subscribe(&job_topic, QoS::AtLeastOnce).await?;
    conn.subscribe(&format!("devices/{id}/commands"), QoS::AtLeastOnce)
        .await?;
    // Desired-state changes: applied and reported back, like a real
    // thermostat would; after connecting, ask for what was missed.
    conn.subscribe(
        &format!("devices/{id}/shadow/update/delta"),
        QoS::AtLeastOnce,
    )
    .await?;
    conn.subscribe(
        &format!("devices/{id}/shadow/get/accepted"),
        QoS::AtLeastOnce,
    )
    .await?;
    let shadow_update = format!("devices/{id}/shadow/update");
    let pid = conn.next_packet_id();
    conn.queue(&Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: format!("devices/{id}/shadow/get"),
        packet_id: Some(pid),
        properties: Default::default(),
        payload: Bytes::from_static(b"{}"),
    }))?;
    // (Publishes only after the last SUBACK: no ack is expected before.)
    if let Some(job) = fw.rebooted_into.take() {
        queue_pub(
            &mut conn,
            &format!("devices/{id}/ota/status"),
            crate::ota::status(&job, "succeeded", Some(100), None, Some(&fw.version)),
        )?;
        stats.ota_installed.fetch_add(1, Ordering::Relaxed);
    }
    queue_pub(
        &mut conn,
        &format!("devices/{id}/ota/job/get"),
        b"{}".to_vec(),
    )?;
    conn.flush().await?;
    let telemetry = format!("devices/{id}/telemetry");
    let response_topic = format!("devices/{id}/commands/response");
    let mut tick = tokio::time::interval_at(Instant::now() + phase, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let keep_alive = Duration::from_secs(u64::from(cfg.keep_alive) / 2);
    let mut last_sent = Instant::now();
    // Diagnostic uploads run beside the session; their answers come back
    // here to be published on this connection.
    let started = Instant::now();
    let mut diag = crate::diagnostics::DeviceState {
        device_id: id.to_string(),
        profile: format!("{:?}", machine.profile).to_lowercase(),
        ..Default::default()
    };
    let (uploaded_tx, mut uploaded) = tokio::sync::mpsc::channel::<(Publish, Value)>(4);
    // QoS 2 commands whose PUBREL is awaited: a resent one is not applied twice.
    let mut qos2: HashSet<u16> = HashSet::new();
    loop {
        tokio::select! {
            p = conn.recv() => match p? {
                Packet::Publish(p) => {
                    match p.qos {
                        QoS::AtMostOnce => {}
                        QoS::AtLeastOnce => {
                            if let Some(pid) = p.packet_id {
                                conn.queue(&Packet::PubAck(PubResponse::new(pid, 0)))?;
                            }
                        }
                        QoS::ExactlyOnce => {
                            if let Some(pid) = p.packet_id {
                                conn.queue(&Packet::PubRec(PubResponse::new(pid, 0)))?;
                                if !qos2.insert(pid) {
                                    conn.flush().await?;
                                    continue;
                                }
                            }
                        }
                    }
                    if p.topic == job_topic {
                        conn.flush().await?;
                        if let Some(job) = crate::ota::parse_job(&p.payload) {
                            if do_job(&mut conn, id, &job, &opts.ota, fw, stats).await? {
                                // Installed: reboot.
                                conn.disconnect().await;
                                return Ok(());
                            }
                        }
                        last_sent = Instant::now();
                        continue;
                    }
                    let upload = serde_json::from_slice::<Value>(&p.payload)
                        .ok()
                        .as_ref()
                        .and_then(crate::diagnostics::upload_request);
                    if let Some(report) = report_shadow(&p, &shadow_update) {
                        stats.shadow_reports.fetch_add(1, Ordering::Relaxed);
                        diag.shadow_reports += 1;
                        let pid = conn.next_packet_id();
                        conn.queue(&Packet::Publish(Publish {
                            packet_id: Some(pid),
                            ..report
                        }))?;
                    } else if let Some(req) = upload {
                        diag.running = machine.is_running();
                        diag.uptime = started.elapsed();
                        let (state, tx) = (diag.clone(), uploaded_tx.clone());
                        tokio::spawn(async move {
                            let answer = crate::diagnostics::run(&req, &state, now_ms()).await;
                            // The session may have ended meanwhile: nobody to tell.
                            let _ = tx.send((p, answer)).await;
                        });
                    } else if let Some(answer) = answer_command(&p, machine, &response_topic) {
                        diag.commands_answered += 1;
                        stats.commands.fetch_add(1, Ordering::Relaxed);
                        let pid = conn.next_packet_id();
                        conn.queue(&Packet::Publish(Publish {
                            packet_id: Some(pid),
                            ..answer
                        }))?;
                    }
                    conn.flush().await?;
                    last_sent = Instant::now();
                }
                Packet::PubRel(r) => {
                    qos2.remove(&r.packet_id);
                    conn.queue(&Packet::PubComp(PubResponse::new(r.packet_id, 0)))?;
                    conn.flush().await?;
                }
                Packet::Disconnect(d) => {
                    return Err(conn.lost(format!("broker sent DISCONNECT (reason {:#04x})", d.reason_code)));
                }
                // PUBACKs of our readings, PINGRESP.
                _ => {}
            },
            Some((command, answer)) = uploaded.recv() => {
                stats.commands.fetch_add(1, Ordering::Relaxed);
                diag.commands_answered += 1;
                let pid = conn.next_packet_id();
                conn.queue(&Packet::Publish(Publish {
                    packet_id: Some(pid),
                    ..answer_with(&command, answer, &response_topic)
                }))?;
                conn.flush().await?;
                last_sent = Instant::now();
            }
            _ = tick.tick() => {
                if let Some(reading) = machine.reading(now_ms()) {
                    diag.readings_sent += 1;
                    diag.last_reading = Some(reading.clone());
                    let pid = conn.next_packet_id();
                    conn.queue(&Packet::Publish(Publish {
                        dup: false,
                        qos: QoS::AtLeastOnce,
                        retain: false,
                        topic: telemetry.clone(),
                        packet_id: Some(pid),
                        properties: Default::default(),
                        payload: Bytes::from(reading.to_string()),
                    }))?;
                    stats.published.fetch_add(1, Ordering::Relaxed);
                } else if last_sent.elapsed() < keep_alive {
                    continue;
                } else {
                    conn.queue(&Packet::PingReq)?;
                }
                conn.flush().await?;
                last_sent = Instant::now();
            }
        }
    }
}

/// A shadow delta (or the delta in a `get` answer) applied: the report of
/// the new state (QoS 1, packet id to be set), or `None` for any other
/// message or an empty delta.
pub fn report_shadow(p: &Publish, update_topic: &str) -> Option<Publish> {
    let body: Value = serde_json::from_slice(&p.payload).ok()?;
    let delta = if p.topic.ends_with("/shadow/update/delta") {
        body.get("state")?
    } else if p.topic.ends_with("/shadow/get/accepted") {
        body.get("state")?.get("delta")?
    } else {
        return None;
    };
    if delta.as_object().is_none_or(|m| m.is_empty()) {
        return None;
    }
    let mut report = json!({"state": {"reported": delta}});
    if let Some(token) = body.get("clientToken") {
        report["clientToken"] = token.clone();
    }
    Some(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: update_topic.to_string(),
        packet_id: None,
        properties: Default::default(),
        payload: Bytes::from(report.to_string()),
    })
}

/// Apply a command message to the machine and build its answer (QoS 1,
/// packet id to be set), or `None` when the message is not a command.
pub fn answer_command(p: &Publish, machine: &mut Machine, response_topic: &str) -> Option<Publish> {
    let body: Value = serde_json::from_slice(&p.payload).ok()?;
    let name = body.get("name")?.as_str()?;
    let id = body.get("id").cloned().unwrap_or(Value::Null);
    let answer = match machine.command(name) {
        CommandOutcome::Done => json!({
            "id": id, "status": "ok",
            "state": if machine.is_running() { "running" } else { "stopped" },
        }),
        CommandOutcome::Unknown => json!({
            "id": id, "status": "failed", "error": format!("unknown command {name:?}"),
        }),
    };
    Some(answer_with(p, answer, response_topic))
}

/// The answer `body` to the command message `p` (QoS 1, packet id to be
/// set): on the command's response topic, with its correlation data.
fn answer_with(p: &Publish, answer: Value, response_topic: &str) -> Publish {
    Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: p
            .properties
            .response_topic
            .clone()
            .unwrap_or_else(|| response_topic.to_string()),
        packet_id: None,
        properties: PublishProperties {
            correlation_data: p.properties.correlation_data.clone(),
            ..Default::default()
        }
        .into(),
        payload: Bytes::from(answer.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_735_689_600_000; // 2025-01-01T00:00:00Z
    const MIN: i64 = 60_000;

    fn series(
        profile: Profile,
        seed: u64,
        index: u64,
        from: i64,
        step: i64,
        n: usize,
    ) -> Vec<Value> {
        let mut m = Machine::new(profile, seed, index);
        (0..n)
            .filter_map(|i| m.reading(from + step * i as i64))
            .collect()
    }

    fn num(v: &Value, k: &str) -> f64 {
        v[k].as_f64()
            .unwrap_or_else(|| panic!("{k} missing in {v}"))
    }

    #[test]
    fn profiles_parse_and_name_their_metrics() {
        for p in Profile::ALL {
            assert_eq!(p.name().parse::<Profile>().unwrap(), p);
            let r = series(p, 7, 0, T0, MIN, 2);
            for m in p.metrics() {
                assert!(r[1].get(*m).is_some(), "{p}: {m} missing in {}", r[1]);
            }
        }
        assert!("toaster".parse::<Profile>().is_err());
    }

    #[test]
    fn same_seed_same_readings_other_seed_other_readings() {
        for p in Profile::ALL {
            let a = series(p, 42, 3, T0, 5_000, 200);
            assert_eq!(a, series(p, 42, 3, T0, 5_000, 200), "{p}");
            assert_ne!(a, series(p, 43, 3, T0, 5_000, 200), "{p}");
            assert_ne!(a, series(p, 42, 4, T0, 5_000, 200), "{p}");
        }
    }

    #[test]
    fn readings_stay_in_range_for_days() {
        for seed in 0..5 {
            for r in series(Profile::Factory, seed, 0, T0, 10_000, 30_000) {
                assert!((0.0..=150.0).contains(&num(&r, "temperature")), "{r}");
                assert!((0.0..=15.0).contains(&num(&r, "vibration")), "{r}");
                assert!((0.0..=1_800.0).contains(&num(&r, "rpm")), "{r}");
            }
            for r in series(Profile::Wearable, seed, 0, T0, 10_000, 30_000) {
                assert!((35.0..=200.0).contains(&num(&r, "heart_rate")), "{r}");
                assert!((0.0..=100.0).contains(&num(&r, "battery")), "{r}");
                assert!(num(&r, "steps") >= 0.0);
            }
            for r in series(Profile::Soil, seed, 0, T0, 60_000, 20_000) {
                assert!((0.0..=60.0).contains(&num(&r, "moisture")), "{r}");
                assert!((4.0..=20.0).contains(&num(&r, "temperature")), "{r}");
            }
            for r in series(Profile::Truck, seed, 0, T0, 10_000, 20_000) {
                assert!((0.0..=110.0).contains(&num(&r, "speed_kmh")), "{r}");
                assert!((0.0..=100.0).contains(&num(&r, "fuel_pct")), "{r}");
            }
        }
    }

    #[test]
    fn factory_machines_overheat_now_and_then() {
        // 10 machines for 10 hours: faults happen, and then it is hot.
        let mut faults = 0;
        for i in 0..10 {
            for r in series(Profile::Factory, 1, i, T0, 5_000, 7_200) {
                if r["fault"] == json!(true) {
                    faults += 1;
                    assert!(num(&r, "vibration") > 5.0, "{r}");
                }
            }
        }
        assert!(faults > 0, "no overheating fault in 100 machine hours");
        let hottest = (0..10)
            .flat_map(|i| series(Profile::Factory, 1, i, T0, 5_000, 7_200))
            .map(|r| num(&r, "temperature"))
            .fold(0.0, f64::max);
        assert!(hottest > 85.0, "hottest {hottest}");
    }

    #[test]
    fn meter_follows_the_daily_curve_and_only_counts_up() {
        assert!(daily_load(3.0) < 0.35);
        assert!(daily_load(19.5) > 1.2);
        assert!(daily_load(7.5) > daily_load(3.0) * 2.5);
        for i in 0..5 {
            let day = series(Profile::Meter, 9, i, T0, MIN, 24 * 60);
            let at = |h: usize| num(&day[h * 60], "power_kw");
            assert!(
                at(3) < at(19),
                "device {i}: 03:00 {} vs 19:00 {}",
                at(3),
                at(19)
            );
            assert!(at(3) < at(8), "device {i}");
            let energy: Vec<f64> = day.iter().map(|r| num(r, "energy_kwh")).collect();
            assert!(energy.windows(2).all(|w| w[1] >= w[0]));
            // A day uses roughly the integral of the curve.
            let used = energy.last().unwrap() - energy[0];
            assert!((5.0..40.0).contains(&used), "{used} kWh");
        }
    }

    #[test]
    fn trucks_stay_on_their_loop_and_go_around() {
        let mut m = Machine::new(Profile::Truck, 5, 2);
        let State::Truck { route, .. } = &m.state else {
            unreachable!()
        };
        let route = route.clone();
        let n = route.waypoints.len();
        let on_segment = |p: (f64, f64)| {
            (0..n).any(|i| {
                let (a, b) = (route.waypoints[i], route.waypoints[(i + 1) % n]);
                let cross = (b.0 - a.0) * (p.1 - a.1) - (b.1 - a.1) * (p.0 - a.0);
                let within = |x: f64, y: f64, v: f64| v >= x.min(y) - 1e-6 && v <= x.max(y) + 1e-6;
                cross.abs() < 1e-6 && within(a.0, b.0, p.0) && within(a.1, b.1, p.1)
            })
        };
        let mut segments = std::collections::HashSet::new();
        let mut moved = 0.0;
        let mut prev: Option<(f64, f64)> = None;
        for i in 0..4_000 {
            let r = m.reading(T0 + i * 10_000).unwrap();
            let p = (num(&r, "lat"), num(&r, "lon"));
            assert!(on_segment(p), "{p:?} is off the route");
            if let Some(q) = prev {
                moved += distance_km(p, q);
            }
            prev = Some(p);
            let State::Truck { km, .. } = &m.state else {
                unreachable!()
            };
            segments.insert(route.position(*km).1);
        }
        assert!(moved > 10.0, "moved {moved} km in 11 hours");
        assert_eq!(segments.len(), n, "every leg of the loop is driven");
    }

    #[test]
    fn shutdown_stops_a_machine_until_start() {
        let mut m = Machine::new(Profile::Factory, 3, 0);
        for i in 0..60 {
            m.reading(T0 + i * 5_000);
        }
        assert_eq!(m.command("shutdown"), CommandOutcome::Done);
        assert!(!m.is_running());
        let mut last = None;
        for i in 60..400 {
            let r = m.reading(T0 + i * 5_000).unwrap();
            assert_eq!(num(&r, "rpm"), 0.0);
            assert_eq!(num(&r, "load"), 0.0);
            assert!(num(&r, "vibration") < 0.2);
            last = Some(r);
        }
        // Cooled down to the hall's temperature.
        assert!(num(&last.unwrap(), "temperature") < 30.0);
        assert_eq!(m.command("start"), CommandOutcome::Done);
        let r = (400..460)
            .filter_map(|i| m.reading(T0 + i * 5_000))
            .last()
            .unwrap();
        assert!(num(&r, "rpm") > 200.0, "{r}");
        assert_eq!(m.command("self-destruct"), CommandOutcome::Unknown);

        for p in [Profile::Truck, Profile::Wearable, Profile::Soil] {
            let mut m = Machine::new(p, 3, 0);
            assert!(m.reading(T0).is_some());
            m.command("shutdown");
            assert!(m.reading(T0 + 5_000).is_none(), "{p} still publishing");
            m.command("start");
            assert!(m.reading(T0 + 10_000).is_some());
        }
        let mut meter = Machine::new(Profile::Meter, 3, 0);
        meter.command("shutdown");
        let a = meter.reading(T0).unwrap();
        let b = meter.reading(T0 + 3_600_000).unwrap();
        assert_eq!(num(&b, "power_kw"), 0.0);
        assert_eq!(num(&a, "energy_kwh"), num(&b, "energy_kwh"));
    }

    #[test]
    fn shadow_deltas_are_applied_and_reported() {
        let delta = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "devices/d1/shadow/update/delta".into(),
            packet_id: Some(3),
            properties: Default::default(),
            payload: Bytes::from(
                r#"{"state": {"setpoint": 18.5}, "version": 4, "clientToken": "set-1"}"#,
            ),
        };
        let r = report_shadow(&delta, "devices/d1/shadow/update").expect("a report");
        assert_eq!(r.topic, "devices/d1/shadow/update");
        let body: Value = serde_json::from_slice(&r.payload).expect("json");
        assert_eq!(
            body,
            json!({"state": {"reported": {"setpoint": 18.5}}, "clientToken": "set-1"})
        );
        let get = Publish {
            topic: "devices/d1/shadow/get/accepted".into(),
            payload: Bytes::from(
                r#"{"state": {"desired": {"a": 1}, "reported": {}, "delta": {"a": 1}}}"#,
            ),
            ..delta.clone()
        };
        assert!(report_shadow(&get, "devices/d1/shadow/update").is_some());
        let in_sync = Publish {
            payload: Bytes::from(r#"{"state": {"desired": {"a": 1}, "reported": {"a": 1}}}"#),
            ..get
        };
        assert!(report_shadow(&in_sync, "devices/d1/shadow/update").is_none());
        let cmd = Publish {
            topic: "devices/d1/commands".into(),
            ..delta
        };
        assert!(report_shadow(&cmd, "devices/d1/shadow/update").is_none());
    }

    #[test]
    fn commands_are_answered_with_their_correlation_data() {
        let mut m = Machine::new(Profile::Factory, 1, 0);
        let cmd = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "devices/d1/commands".into(),
            packet_id: Some(1),
            properties: PublishProperties {
                correlation_data: Some(Bytes::from_static(b"cmd-1")),
                ..Default::default()
            }
            .into(),
            payload: Bytes::from(r#"{"id":"cmd-1","name":"shutdown","params":{}}"#),
        };
        let a = answer_command(&cmd, &mut m, "devices/d1/commands/response").unwrap();
        assert_eq!(a.topic, "devices/d1/commands/response");
        assert_eq!(
            a.properties.correlation_data.as_deref(),
            Some(&b"cmd-1"[..])
        );
        let body: Value = serde_json::from_slice(&a.payload).unwrap();
        assert_eq!(body["id"], "cmd-1");
        assert_eq!(body["status"], "ok");
        assert!(!m.is_running());
        let junk = Publish {
            payload: Bytes::from_static(b"not json"),
            ..cmd
        };
        assert!(answer_command(&junk, &mut m, "x").is_none());
    }
}
