//! Learning-rate schedules over epochs (`train.lr_schedule`): constant; Burda, Grosse &
//! Salakhutdinov's (2015, section 5) lr * 10^(-i/7) for 3^i epochs, i = 0..7 (rounded as their
//! code rounds it; over `train.epochs` other than 3,280 the stages keep their proportions, which
//! is how the shortened schedules run); exponential and
//! step decay; and the half-cosine annealing of Loshchilov & Hutter (2017) without restarts.
//! The rate is set once per epoch, so a resumed run takes the same rates as an unbroken one.

use crate::config::{LrSchedule, TrainConfig};

/// The learning rate of epoch `epoch` (1-based).
pub fn lr(t: &TrainConfig, epoch: usize) -> f64 {
    let e = epoch.max(1);
    match t.lr_schedule {
        LrSchedule::Constant => t.lr,
        LrSchedule::Burda => {
            let i = burda_stage(e, t.epochs);
            // Their code (yburda/iwae, experiments.py) rounds 10^(1 - i/7) to one decimal:
            // 1e-3, 7.2e-4, 5.2e-4, 3.7e-4, 2.7e-4, 1.9e-4, 1.4e-4, 1e-4.
            t.lr * (10f64.powf(1.0 - i as f64 / 7.0) * 10.0).round() / 100.0
        }
        LrSchedule::Exponential => t.lr * t.lr_gamma.powi((e - 1) as i32),
        LrSchedule::Step => t.lr * t.lr_gamma.powi(((e - 1) / t.lr_step_epochs) as i32),
        LrSchedule::Cosine => {
            let frac = ((e - 1) as f64 / t.epochs.max(1) as f64).min(1.0);
            t.lr_min + (t.lr - t.lr_min) * 0.5 * (1.0 + (std::f64::consts::PI * frac).cos())
        }
    }
}

/// Epochs in Burda et al.'s whole schedule: sum_{i=0}^{7} 3^i.
pub const BURDA_EPOCHS: usize = 3280;

/// The stage i (0..=7) of Burda et al.'s schedule that epoch `e` (1-based) falls in, with the
/// eight stages laid over `epochs`: stage i ends at epoch round(sum_{j<=i} 3^j * epochs / 3280),
/// at least i + 1, so `epochs = 3280` is their schedule exactly (stage i is 3^i epochs) and a
/// shorter run (a shortened schedule) takes the same eight rates in the same proportions.
/// Past the last stage the rate stays at the last one.
fn burda_stage(e: usize, epochs: usize) -> u32 {
    let epochs = if epochs == 0 { BURDA_EPOCHS } else { epochs };
    let mut cum = 0usize;
    for i in 0..7u32 {
        cum += 3usize.pow(i);
        // Integer rounding of cum * epochs / 3280 (no float edge cases at the stage ends).
        let end = ((cum * epochs * 2 + BURDA_EPOCHS) / (2 * BURDA_EPOCHS)).max(i as usize + 1);
        if e <= end {
            return i;
        }
    }
    7
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(s: LrSchedule) -> TrainConfig {
        TrainConfig {
            lr: 1e-3,
            lr_schedule: s,
            lr_gamma: 0.5,
            lr_step_epochs: 10,
            lr_min: 1e-5,
            epochs: 100,
            ..Default::default()
        }
    }

    #[test]
    fn hand_values() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12 * b.abs().max(1e-12);
        let b = TrainConfig {
            epochs: BURDA_EPOCHS,
            ..cfg(LrSchedule::Burda)
        };
        // Stage 0: epoch 1; stage 1: epochs 2-4; stage 2: 5-13; ... stage 7 ends at 3280.
        // Rates as their code rounds them: 1e-3, 7.2e-4, 5.2e-4, 3.7e-4, ...
        assert!(close(lr(&b, 1), 1e-3));
        assert!(close(lr(&b, 2), 7.2e-4));
        assert!(close(lr(&b, 4), 7.2e-4));
        assert!(close(lr(&b, 5), 5.2e-4));
        assert!(close(lr(&b, 13), 5.2e-4));
        assert!(close(lr(&b, 14), 3.7e-4));
        assert!(close(lr(&b, 40), 3.7e-4) && close(lr(&b, 41), 2.7e-4));
        assert!(close(lr(&b, BURDA_EPOCHS), 1e-4));
        assert!(close(lr(&b, BURDA_EPOCHS + 5), 1e-4));
        assert_eq!((0..=7).map(|i| 3usize.pow(i)).sum::<usize>(), BURDA_EPOCHS);
        // Their stage ends, 1, 4, 13, 40, 121, 364, 1093: the last epoch of each stage.
        for (i, end) in [1, 4, 13, 40, 121, 364, 1093].into_iter().enumerate() {
            assert_eq!(burda_stage(end, BURDA_EPOCHS), i as u32);
            assert_eq!(burda_stage(end + 1, BURDA_EPOCHS), i as u32 + 1);
        }
        // A tenth of the schedule (328 epochs): ends 0.1, 0.4, 1.3, 4, 12.1, 36.4, 109.3 of the
        // whole, rounded and at least one epoch per stage: 1, 2, 3, 4, 12, 36, 109, then 328.
        let short: Vec<u32> = [1, 2, 3, 4, 5, 12, 13, 36, 37, 109, 110, 328, 400]
            .into_iter()
            .map(|e| burda_stage(e, 328))
            .collect();
        assert_eq!(short, [0, 1, 2, 3, 4, 4, 5, 5, 6, 6, 7, 7, 7]);
        let s = TrainConfig {
            epochs: 328,
            ..b.clone()
        };
        assert!(close(lr(&s, 109), 1.4e-4) && close(lr(&s, 110), 1e-4));
        // A third (1,093 epochs): stage ends 0, 1, 4, 13, 40, 121, 364 of the whole, in thirds.
        assert_eq!(burda_stage(364, 1093), 6);
        assert_eq!(burda_stage(365, 1093), 7);
        // Exponential halving: 1e-3, 5e-4, 2.5e-4; step: halves after epochs 10 and 20.
        let x = cfg(LrSchedule::Exponential);
        assert!(close(lr(&x, 1), 1e-3) && close(lr(&x, 3), 2.5e-4));
        let s = cfg(LrSchedule::Step);
        assert!(close(lr(&s, 10), 1e-3) && close(lr(&s, 11), 5e-4) && close(lr(&s, 21), 2.5e-4));
        // Cosine: lr at epoch 1, the midpoint (lr + lr_min) / 2 at epoch 51 of 100.
        let c = cfg(LrSchedule::Cosine);
        assert!(close(lr(&c, 1), 1e-3) && close(lr(&c, 51), (1e-3 + 1e-5) / 2.0));
        assert!(close(lr(&cfg(LrSchedule::Constant), 77), 1e-3));
    }
}
