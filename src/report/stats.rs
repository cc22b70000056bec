//! Summary statistics over seeds: mean, sample standard deviation, n, and
//! Welch's unequal-variance t-test (two-sided p-value through the
//! regularised incomplete beta function, Numerical Recipes' continued
//! fraction; no statistics crate for forty lines).

/// mean, sample std (n − 1; 0 for n = 1), n
pub fn mean_std(v: &[f64]) -> (f64, f64, usize) {
    let n = v.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, 0);
    }
    let m = v.iter().sum::<f64>() / n as f64;
    let s = if n > 1 {
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
    } else {
        0.0
    };
    (m, s, n)
}

fn ln_gamma(x: f64) -> f64 {
    // Lanczos, g = 7, n = 9
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + 7.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

fn beta_cf(a: f64, b: f64, x: f64) -> f64 {
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let tiny = 1e-300;
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    if d.abs() < tiny {
        d = tiny;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..300 {
        let m = m as f64;
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 + aa * d;
        if d.abs() < tiny {
            d = tiny;
        }
        c = 1.0 + aa / c;
        if c.abs() < tiny {
            c = tiny;
        }
        d = 1.0 / d;
        h *= d * c;
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 + aa * d;
        if d.abs() < tiny {
            d = tiny;
        }
        c = 1.0 + aa / c;
        if c.abs() < tiny {
            c = tiny;
        }
        d = 1.0 / d;
        let del = d * c;
        h *= del;
        if (del - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// Regularised incomplete beta I_x(a, b).
pub fn inc_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let bt = (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    if x < (a + 1.0) / (a + b + 2.0) {
        bt * beta_cf(a, b, x) / a
    } else {
        1.0 - bt * beta_cf(b, a, 1.0 - x) / b
    }
}

/// Two-sided p-value of Student's t with `df` degrees of freedom.
pub fn t_two_sided(t: f64, df: f64) -> f64 {
    inc_beta(df / 2.0, 0.5, df / (df + t * t))
}

/// The two-sided 95% quantile of Student's t with `df` degrees of
/// freedom, by bisection on [`t_two_sided`].
pub fn t95(df: f64) -> f64 {
    let (mut lo, mut hi) = (0.0, 1000.0);
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if t_two_sided(mid, df) > 0.05 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Welch's t-test of mean(a) − mean(b): (t, df, two-sided p). None when a
/// side has fewer than two values or both have no variance.
pub fn welch(a: &[f64], b: &[f64]) -> Option<(f64, f64, f64)> {
    let (ma, sa, na) = mean_std(a);
    let (mb, sb, nb) = mean_std(b);
    if na < 2 || nb < 2 {
        return None;
    }
    let (va, vb) = (sa * sa / na as f64, sb * sb / nb as f64);
    if va + vb == 0.0 {
        return None;
    }
    let t = (ma - mb) / (va + vb).sqrt();
    let df = (va + vb).powi(2) / (va * va / (na - 1) as f64 + vb * vb / (nb - 1) as f64);
    Some((t, df, t_two_sided(t, df)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_distribution_matches_tables() {
        // Two-sided p-values from standard t tables.
        assert!((t_two_sided(1.0, 1.0) - 0.5).abs() < 1e-9); // Cauchy: 2·atan(1)/π
        assert!((t_two_sided(2.0, 10.0) - 0.073_388).abs() < 1e-5);
        assert!((t_two_sided(2.228_138_85, 10.0) - 0.05).abs() < 1e-6);
        assert!((t_two_sided(12.706_204_7, 1.0) - 0.05).abs() < 1e-6);
        assert!((t_two_sided(0.0, 5.0) - 1.0).abs() < 1e-12);
        // and the 95% quantiles from the same tables
        assert!((t95(10.0) - 2.228_138_85).abs() < 1e-6);
        assert!((t95(1.0) - 12.706_204_7).abs() < 1e-5);
        assert!((t95(4.0) - 2.776_445_1).abs() < 1e-6);
    }

    #[test]
    fn welch_by_hand() {
        // a: mean 2, var 1; b: mean 5, var 1; n = 3 each.
        // t = −3 / sqrt(1/3 + 1/3) = −3.674235, df = 4
        let (t, df, p) = welch(&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]).unwrap();
        assert!((t + 3.674_234_6).abs() < 1e-6);
        assert!((df - 4.0).abs() < 1e-12);
        assert!((p - t_two_sided(3.674_234_6, 4.0)).abs() < 1e-9);
        assert!((p - 0.021_311).abs() < 1e-5);
        assert!(welch(&[1.0], &[2.0, 3.0]).is_none());
        let (m, s, n) = mean_std(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        assert_eq!((m, n), (5.0, 8));
        assert!((s - (32.0f64 / 7.0).sqrt()).abs() < 1e-12);
    }
}
