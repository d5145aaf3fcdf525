//! Code tables: commands (CN), system codes (ST), data flags, QnRtn/ExeRtn and
//! the common factor codes with units and their HJ/T 212-2005 equivalents.
//!
//! Sources: HJ 212-2017 Tables 5-9 and App. B; HJ/T 212-2005 §6.5 and App. B;
//! the 2025 additions as far as public material shows them (see the 2025 digest).
//! Dispatch is always on (dialect, direction, CN): 1001 and 1014 mean
//! different things in different editions.

use super::dialect::Dialect;

/// Who sends a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Field device (现场机) to platform (上位机).
    Up,
    /// Platform to field device.
    Down,
}

/// The exchange a command belongs to (HJ 212-2017 §6.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exchange {
    /// Upload: 1-2 steps, answered by 9014 when the ack bit is set.
    Upload,
    /// Request: request, 9011, optional data, 9012.
    Request,
    /// Notify: answered by 9013.
    Notify,
    /// An interaction reply (9011..9014): never answered.
    Reply,
}

impl Exchange {
    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Exchange::Upload => "upload",
            Exchange::Request => "request",
            Exchange::Notify => "notify",
            Exchange::Reply => "reply",
        }
    }
}

/// One row of the command table.
#[derive(Debug, Clone, Copy)]
pub struct Command {
    /// CN.
    pub cn: u16,
    /// Sender.
    pub dir: Dir,
    /// Exchange type.
    pub exchange: Exchange,
    /// English name.
    pub name: &'static str,
    /// Editions that define it: bit 0 = 2005, bit 1 = 2017, bit 2 = 2025, bit 3 = surface water.
    editions: u8,
}

const E05: u8 = 1;
const E17: u8 = 2;
const E25: u8 = 4;
const ESW: u8 = 8;
const ALL: u8 = E05 | E17 | E25 | ESW;
const M17: u8 = E17 | E25 | ESW;

const fn c(cn: u16, dir: Dir, exchange: Exchange, editions: u8, name: &'static str) -> Command {
    Command {
        cn,
        dir,
        exchange,
        name,
        editions,
    }
}

use Dir::{Down, Up};
use Exchange::{Notify, Reply, Request, Upload};

/// The command table. Rows for the same CN differ by direction or edition.
pub static COMMANDS: &[Command] = &[
    c(1000, Down, Request, ALL, "set timeout and retries"),
    c(1001, Down, Request, E05, "set over-limit alarm time"),
    c(1001, Up, Notify, E25, "upload data-logger hardware ids"),
    c(1002, Down, Request, E25, "set data-logger MN"),
    c(1011, Down, Request, ALL, "get field time"),
    c(1011, Up, Upload, ALL, "upload field time"),
    c(1012, Down, Request, ALL, "set field time"),
    c(1013, Up, Notify, M17, "time calibration request"),
    c(1014, Up, Notify, E25, "request new key"),
    c(1014, Down, Request, E25, "push new key"),
    c(1014, Down, Request, ESW, "get logger time"),
    c(1015, Down, Request, ESW, "set logger time"),
    c(1021, Down, Request, E05, "get alarm thresholds"),
    c(1021, Up, Upload, E05, "upload alarm thresholds"),
    c(1022, Down, Request, E05, "set alarm thresholds"),
    c(1031, Down, Request, E05, "get host address"),
    c(1031, Up, Upload, E05, "upload host address"),
    c(1032, Down, Request, E05, "set host address"),
    c(1041, Down, Request, E05, "get daily report time"),
    c(1041, Up, Upload, E05, "upload daily report time"),
    c(1042, Down, Request, E05, "set daily report time"),
    c(1061, Down, Request, ALL, "get real-time interval"),
    c(1061, Up, Upload, ALL, "upload real-time interval"),
    c(1062, Down, Request, ALL, "set real-time interval"),
    c(1063, Down, Request, M17, "get minute interval"),
    c(1063, Up, Upload, M17, "upload minute interval"),
    c(1064, Down, Request, M17, "set minute interval"),
    c(1072, Down, Request, ALL, "set password"),
    c(2011, Up, Upload, ALL, "real-time data"),
    c(2011, Down, Request, ALL, "start real-time data"),
    c(2012, Down, Notify, ALL, "stop real-time data"),
    c(2013, Up, Upload, E25, "raw monitoring data"),
    c(2013, Down, Request, E25, "get raw monitoring data"),
    c(2021, Up, Upload, ALL, "facility state"),
    c(2021, Down, Request, ALL, "start facility state data"),
    c(2022, Down, Notify, ALL, "stop facility state data"),
    c(2031, Up, Upload, ALL, "daily data"),
    c(2031, Down, Request, ALL, "get daily history"),
    c(2041, Up, Upload, ALL, "facility running time"),
    c(
        2041,
        Down,
        Request,
        ALL,
        "get facility running time history",
    ),
    c(2051, Up, Upload, ALL, "minute data"),
    c(2051, Down, Request, ALL, "get minute history"),
    c(2052, Up, Upload, E25, "noise single measurement"),
    c(2061, Up, Upload, ALL, "hour data"),
    c(2061, Down, Request, ALL, "get hour history"),
    c(2062, Up, Upload, E25 | ESW, "standard-sample check data"),
    c(
        2062,
        Down,
        Request,
        E25 | ESW,
        "get standard-sample check data",
    ),
    c(2071, Up, Upload, E05, "alarm records"),
    c(2071, Down, Request, E05, "get alarm records"),
    c(2072, Up, Notify, E05, "alarm event"),
    c(2081, Up, Upload, M17, "data-logger power-on time"),
    c(2111, Up, Upload, E25, "furnace temperature 5-minute mean"),
    c(3011, Down, Request, ALL, "zero/span calibration"),
    c(3012, Down, Request, ALL, "immediate sampling"),
    c(3013, Down, Request, ALL, "start cleaning / back-blow"),
    c(
        3014,
        Down,
        Request,
        ALL,
        "comparison sampling (2005: set sampling period)",
    ),
    c(3015, Down, Request, M17, "over-limit sample retention"),
    c(3015, Up, Upload, M17, "sample retention info"),
    c(3016, Down, Request, M17, "set sampling period"),
    c(3017, Down, Request, M17, "get sampling period"),
    c(3017, Up, Upload, M17, "upload sampling period"),
    c(3018, Down, Request, M17, "get sample output time"),
    c(3018, Up, Upload, M17, "upload sample output time"),
    c(3019, Down, Request, M17, "get instrument id"),
    c(3019, Up, Upload, M17, "instrument id"),
    c(3020, Down, Request, M17, "get field info"),
    c(3020, Up, Upload, M17, "field info"),
    c(3021, Down, Request, M17, "set field parameter"),
    c(3022, Down, Request, E25, "immediate sample retention task"),
    c(
        3024,
        Down,
        Request,
        E25 | ESW,
        "start standard-sample check",
    ),
    c(9011, Up, Reply, ALL, "request reply"),
    c(9011, Down, Reply, ALL, "request reply"),
    c(9012, Up, Reply, ALL, "execution result"),
    c(9012, Down, Reply, ALL, "execution result"),
    c(9013, Up, Reply, ALL, "notify reply"),
    c(9013, Down, Reply, ALL, "notify reply"),
    c(9014, Up, Reply, ALL, "data reply"),
    c(9014, Down, Reply, ALL, "data reply"),
    c(9015, Up, Notify, ALL, "heartbeat"),
    c(9021, Up, Notify, E05, "heartbeat (vendor 2005)"),
];

fn edition_bit(d: Dialect) -> u8 {
    match d {
        Dialect::V2005 => E05,
        Dialect::V2017 => E17,
        Dialect::V2025 => E25,
        Dialect::SurfaceWater => ESW,
    }
}

/// Looks up a command by dialect, sender and CN.
pub fn command(dialect: Dialect, dir: Dir, cn: u16) -> Option<&'static Command> {
    let bit = edition_bit(dialect);
    COMMANDS
        .iter()
        .find(|c| c.cn == cn && c.dir == dir && c.editions & bit != 0)
}

/// System code (ST) meaning, HJ 212-2017 Table 5 (2005 §6.5 differs only in 23).
pub fn system_name(st: &str, dialect: Option<Dialect>) -> Option<&'static str> {
    Some(match st {
        "21" => "surface water quality",
        "22" => "air quality",
        "23" if dialect == Some(Dialect::V2005) => "regional environmental noise",
        "23" => "acoustic environment quality",
        "24" => "groundwater quality",
        "25" => "soil quality",
        "26" => "seawater quality",
        "27" => "VOC monitoring",
        "31" => "atmospheric pollution source",
        "32" => "surface-water pollution source",
        "33" => "groundwater pollution source",
        "34" => "marine pollution source",
        "35" => "soil pollution source",
        "36" => "noise pollution source",
        "37" => "vibration pollution source",
        "38" => "radioactive pollution source",
        "39" => "construction-site dust source",
        "41" => "electromagnetic pollution source",
        "44" => "electricity monitoring",
        "45" => "key production conditions",
        "51" => "flue-gas process monitoring",
        "52" => "wastewater process monitoring",
        "91" => "system interaction",
        _ => return None,
    })
}

/// Data flag meaning (`xxxxxx-Flag`), HJ 212-2017 Table 8 plus the 2005 extras.
/// Flags are stored as short strings, never as an enum: fields carry vendor letters.
pub fn data_flag_name(flag: &str) -> Option<&'static str> {
    Some(match flag {
        "N" => "normal",
        "F" => "instrument stopped",
        "M" => "maintenance",
        "S" => "manually set value",
        "D" => "instrument fault",
        "C" => "calibration",
        "T" => "above measuring range",
        "B" => "communication failure",
        "P" => "power failure (2005)",
        _ => return None,
    })
}

/// QnRtn meaning, HJ 212-2017 Table 7.
pub fn qn_rtn_name(code: &str) -> Option<&'static str> {
    Some(match code {
        "1" => "ready to execute",
        "2" => "request rejected",
        "3" => "PW error",
        "4" => "MN error",
        "5" => "ST error",
        "6" => "Flag error",
        "7" => "QN error",
        "8" => "CN error",
        "9" => "CRC error",
        "100" => "unknown error",
        _ => return None,
    })
}

/// ExeRtn meaning, HJ 212-2017 Table 6.
pub fn exe_rtn_name(code: &str) -> Option<&'static str> {
    Some(match code {
        "1" => "success",
        "2" => "failed, reason unknown",
        "3" => "request condition error",
        "4" => "communication timeout",
        "5" => "system busy",
        "6" => "system fault",
        "100" => "no data",
        _ => return None,
    })
}

/// A factor code with its default units.
#[derive(Debug, Clone, Copy)]
pub struct Factor {
    /// 2017 code.
    pub code: &'static str,
    /// HJ/T 212-2005 code ("原编码"), if any.
    pub code_2005: Option<&'static str>,
    /// English name.
    pub name: &'static str,
    /// Unit of concentration / instantaneous values.
    pub unit: &'static str,
    /// Unit of `-Cou` (cumulative amount), if defined.
    pub cou_unit: Option<&'static str>,
}

const fn f(
    code: &'static str,
    code_2005: Option<&'static str>,
    name: &'static str,
    unit: &'static str,
    cou_unit: Option<&'static str>,
) -> Factor {
    Factor {
        code,
        code_2005,
        name,
        unit,
        cou_unit,
    }
}

/// Common factors, HJ 212-2017 App. B Tables B.1/B.2. Units are defaults: devices
/// deviate (particulates, flows), so operators can override them per device.
pub static FACTORS: &[Factor] = &[
    f("w00000", Some("B01"), "wastewater flow", "L/s", Some("m3")),
    f("w01001", Some("001"), "pH", "", None),
    f("w01002", Some("002"), "colour", "degree", None),
    f("w01009", None, "dissolved oxygen", "mg/L", None),
    f("w01010", None, "water temperature", "°C", None),
    f(
        "w01012",
        Some("003"),
        "suspended solids",
        "mg/L",
        Some("kg"),
    ),
    f("w01014", None, "conductivity", "µS/cm", None),
    f("w01017", Some("010"), "BOD5", "mg/L", Some("kg")),
    f("w01018", Some("011"), "COD", "mg/L", Some("kg")),
    f("w01019", None, "permanganate index", "mg/L", Some("kg")),
    f("w01020", Some("015"), "TOC", "mg/L", Some("kg")),
    f("w20111", Some("020"), "total mercury", "µg/L", Some("g")),
    f("w20115", Some("022"), "total cadmium", "µg/L", Some("g")),
    f("w20116", Some("023"), "total chromium", "mg/L", Some("kg")),
    f(
        "w20117",
        Some("024"),
        "hexavalent chromium",
        "µg/L",
        Some("g"),
    ),
    f("w20119", Some("026"), "total arsenic", "µg/L", Some("g")),
    f("w20120", Some("027"), "total lead", "µg/L", Some("g")),
    f("w20121", Some("028"), "total nickel", "mg/L", Some("kg")),
    f("w20122", Some("029"), "total copper", "mg/L", Some("kg")),
    f("w20123", Some("030"), "total zinc", "mg/L", Some("kg")),
    f("w21001", Some("065"), "total nitrogen", "mg/L", Some("kg")),
    f(
        "w21003",
        Some("060"),
        "ammonia nitrogen",
        "mg/L",
        Some("kg"),
    ),
    f(
        "w21011",
        Some("101"),
        "total phosphorus",
        "mg/L",
        Some("kg"),
    ),
    f("w21016", Some("070"), "cyanide", "mg/L", Some("kg")),
    f("w22001", Some("080"), "petroleum oils", "mg/L", Some("kg")),
    f("w23002", Some("110"), "volatile phenol", "mg/L", Some("kg")),
    f("a00000", Some("B02"), "flue-gas flow", "m3/s", Some("m3")),
    f("a01011", Some("S02"), "flue-gas velocity", "m/s", None),
    f("a01012", Some("S03"), "flue-gas temperature", "°C", None),
    f("a01013", Some("S08"), "flue-gas pressure", "kPa", None),
    f("a01014", Some("S05"), "flue-gas humidity", "%", None),
    f("a01015", Some("S06"), "cooler temperature", "°C", None),
    f("a01016", Some("S07"), "duct cross-section", "m2", None),
    f(
        "a01017",
        Some("S04"),
        "flue-gas dynamic pressure",
        "kPa",
        None,
    ),
    f("a19001", Some("S01"), "O2", "%", None),
    f(
        "a34013",
        Some("01"),
        "particulates (smoke dust)",
        "mg/m3",
        Some("kg"),
    ),
    f("a21026", Some("02"), "SO2", "mg/m3", Some("kg")),
    f("a21002", Some("03"), "NOx", "mg/m3", Some("kg")),
    f("a21003", None, "NO", "mg/m3", Some("kg")),
    f("a21004", None, "NO2", "mg/m3", Some("kg")),
    f("a21005", Some("04"), "CO", "mg/m3", Some("kg")),
    f("a21028", Some("05"), "H2S", "mg/m3", Some("kg")),
    f("a21024", Some("08"), "HCl", "mg/m3", Some("kg")),
    f("a21001", Some("10"), "ammonia", "ng/m3", Some("g")),
    f("a05001", Some("30"), "CO2", "mg/m3", Some("kg")),
    f(
        "a24088",
        None,
        "non-methane hydrocarbons",
        "mg/m3",
        Some("kg"),
    ),
    f("a24087", Some("25"), "hydrocarbons", "mg/m3", Some("kg")),
    f("a25002", None, "benzene", "mg/m3", Some("kg")),
    f("a25003", Some("17"), "toluene", "mg/m3", Some("kg")),
    f("a25005", Some("18"), "xylene", "mg/m3", Some("kg")),
    f("a01010", Some("37"), "Ringelmann blackness", "", None),
    f("a01901", None, "furnace mean temperature", "°C", None),
    f("a01902", None, "furnace DCS temperature", "°C", None),
    f("a01001", None, "ambient temperature", "°C", None),
    f("a01002", None, "ambient humidity", "%", None),
    f("a01006", None, "atmospheric pressure", "kPa", None),
    f("a01007", None, "wind speed", "m/s", None),
    f("a01008", None, "wind direction", "°", None),
    f("a34001", None, "TSP", "µg/m3", Some("g")),
    f("a34002", None, "PM10", "µg/m3", Some("g")),
    f("a34004", None, "PM2.5", "µg/m3", Some("g")),
    f("LA", Some("B03"), "noise level A", "dB", None),
    f("Leq", None, "equivalent noise level", "dB", None),
];

/// Looks up a factor by its 2017 code or, failing that, its 2005 code.
pub fn factor(code: &str) -> Option<&'static Factor> {
    FACTORS
        .iter()
        .find(|f| f.code == code)
        .or_else(|| FACTORS.iter().find(|f| f.code_2005 == Some(code)))
}

/// Maps an HJ/T 212-2005 factor code to its 2017 code ("原编码" column).
pub fn map_2005_to_2017(code: &str) -> Option<&'static str> {
    FACTORS
        .iter()
        .find(|f| f.code_2005 == Some(code))
        .map(|f| f.code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatch_depends_on_dialect_and_direction() {
        assert_eq!(
            command(Dialect::V2017, Dir::Up, 2011).unwrap().exchange,
            Exchange::Upload
        );
        assert_eq!(
            command(Dialect::V2017, Dir::Down, 2011).unwrap().exchange,
            Exchange::Request
        );
        assert_eq!(
            command(Dialect::V2017, Dir::Up, 1013).unwrap().exchange,
            Exchange::Notify
        );
        assert!(command(Dialect::V2005, Dir::Up, 1013).is_none());
        assert_eq!(
            command(Dialect::V2005, Dir::Up, 2072).unwrap().exchange,
            Exchange::Notify
        );
        assert_eq!(
            command(Dialect::V2025, Dir::Up, 1001).unwrap().exchange,
            Exchange::Notify
        );
        assert_eq!(
            command(Dialect::V2005, Dir::Down, 1001).unwrap().exchange,
            Exchange::Request
        );
        assert_eq!(
            command(Dialect::V2025, Dir::Up, 9015).unwrap().exchange,
            Exchange::Notify
        );
        assert_eq!(
            command(Dialect::V2025, Dir::Up, 9014).unwrap().exchange,
            Exchange::Reply
        );
    }

    #[test]
    fn factor_mapping() {
        assert_eq!(map_2005_to_2017("011"), Some("w01018"));
        assert_eq!(map_2005_to_2017("B02"), Some("a00000"));
        assert_eq!(factor("a21026").unwrap().unit, "mg/m3");
        assert_eq!(factor("060").unwrap().code, "w21003");
        assert_eq!(data_flag_name("N"), Some("normal"));
        assert_eq!(qn_rtn_name("9"), Some("CRC error"));
        assert_eq!(exe_rtn_name("100"), Some("no data"));
        assert_eq!(
            system_name("23", Some(Dialect::V2005)),
            Some("regional environmental noise")
        );
    }
}
