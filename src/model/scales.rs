//! [`Scales`]: a set of inference or training scales, the value that walks
//! from a suite's TOML through training, evaluation and the store into the
//! report (see `docs/architecture.md`).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::str::FromStr;

/// Scales sorted from low to high (by `f64::total_cmp`), compared, hashed
/// and ordered by their bits, so that `[1.0, 0.5]` and `[0.5, 1.0]` are one
/// set and a set can key a map.
///
/// - TOML and the config hash see a plain array of numbers (`[0.5, 1.0]`);
/// - people and the store see text: `0.5,1.0` ([`Display`](fmt::Display),
///   what the official code's output keys look like), parsed back by
///   [`FromStr`];
/// - `&Scales` reads as `&[f64]`.
///
/// Whether the set suits a fusion (not empty, positive, no repeats, 1.0
/// where needed) is [`Fusion::check_scales`](super::Fusion::check_scales),
/// which names the field in its error.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(from = "Vec<f64>", into = "Vec<f64>")]
pub struct Scales(Vec<f64>);

impl Scales {
    pub fn new(mut v: Vec<f64>) -> Self {
        v.sort_by(f64::total_cmp);
        Self(v)
    }

    /// The one scale of a single-scale set.
    pub fn single(&self) -> Option<f64> {
        match self.0[..] {
            [s] => Some(s),
            _ => None,
        }
    }
}

impl From<Vec<f64>> for Scales {
    fn from(v: Vec<f64>) -> Self {
        Self::new(v)
    }
}

impl<const N: usize> From<[f64; N]> for Scales {
    fn from(v: [f64; N]) -> Self {
        Self::new(v.to_vec())
    }
}

impl From<Scales> for Vec<f64> {
    fn from(s: Scales) -> Self {
        s.0
    }
}

impl Deref for Scales {
    type Target = [f64];
    fn deref(&self) -> &[f64] {
        &self.0
    }
}

impl PartialEq for Scales {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Scales {}

impl PartialOrd for Scales {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scales {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let n = self.0.len().cmp(&other.0.len());
        self.0
            .iter()
            .zip(&other.0)
            .map(|(a, b)| a.total_cmp(b))
            .find(|o| o.is_ne())
            .unwrap_or(n)
    }
}

impl Hash for Scales {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.0.len().hash(h);
        self.0.iter().for_each(|s| s.to_bits().hash(h));
    }
}

/// A scale written as in the official code's output keys: `0.5`, `1.0`,
/// `2.0`, `0.25`.
pub fn format_scale(s: f64) -> String {
    if s.fract() == 0.0 {
        format!("{s:.1}")
    } else {
        format!("{s}")
    }
}

impl fmt::Display for Scales {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, so that widths such as `{:<20}` apply
        let text: Vec<String> = self.0.iter().map(|&s| format_scale(s)).collect();
        f.pad(&text.join(","))
    }
}

impl FromStr for Scales {
    type Err = String;
    /// `0.5,1,2` (spaces allowed).
    fn from_str(s: &str) -> Result<Self, String> {
        s.split(',')
            .map(|p| {
                p.trim()
                    .parse::<f64>()
                    .map_err(|_| format!("`{p}` is not a scale (expected e.g. 0.5,1.0,2.0)"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self::new)
    }
}

/// Serialises a value as its `Display` text (for outputs where a scale set
/// is a label, such as the report's JSON, rather than an array).
pub fn as_text<T: fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn text_round_trip_and_order() {
        let s: Scales = "1, 0.5,2".parse().unwrap();
        assert_eq!(&s[..], &[0.5, 1.0, 2.0]);
        assert_eq!(s.to_string(), "0.5,1.0,2.0");
        assert_eq!(format!("[{s:<13}]"), "[0.5,1.0,2.0  ]");
        assert_eq!(
            Scales::from([0.25, 0.5, 1.0, 2.0]).to_string(),
            "0.25,0.5,1.0,2.0"
        );
        assert_eq!(s.to_string().parse::<Scales>().unwrap(), s);
        assert!("0.5,x".parse::<Scales>().is_err());
        assert!("".parse::<Scales>().is_err());
    }

    #[test]
    fn equality_hash_and_ordering_are_by_value_as_a_set() {
        let a = Scales::from([1.0, 0.5]);
        let b = Scales::from([0.5, 1.0]);
        assert_eq!(a, b);
        let set: HashSet<Scales> = [a.clone(), b].into_iter().collect();
        assert_eq!(set.len(), 1);
        assert!(Scales::from([0.5]) < a);
        assert!(a < Scales::from([0.5, 2.0]));
        assert_ne!(a, Scales::from([0.5, 1.0, 2.0]));
        assert_eq!(a.single(), None);
        assert_eq!(Scales::from([2.0]).single(), Some(2.0));
    }

    /// TOML sees an array, as `Vec<f64>` did (the config hash depends on it).
    #[test]
    fn serialises_as_an_array() {
        #[derive(Serialize, Deserialize)]
        struct T {
            scales: Scales,
        }
        let t: T = toml::from_str("scales = [1.0, 0.5]").unwrap();
        assert_eq!(t.scales.to_string(), "0.5,1.0");
        assert_eq!(serde_json::to_string(&t).unwrap(), r#"{"scales":[0.5,1.0]}"#);
    }
}
