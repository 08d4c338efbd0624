//! What the report tests share: the suite's experiments and how to read a
//! written report's verdicts.

/// Every experiment of the suite, in report order.
pub const EXPERIMENTS: [&str; 11] = [
    "signal",
    "depth",
    "robustness",
    "batch_size",
    "placement",
    "train_eval",
    "gradient_mixing",
    "jacobian",
    "exploding",
    "sync",
    "advice",
];

/// The texts of the report's verdict badges (`class="verdict ..."`), in
/// page order: one in the claims table and one in the section, per experiment.
pub fn verdicts(html: &str) -> Vec<&str> {
    html.match_indices("class=\"verdict ")
        .map(|(i, _)| {
            let rest = &html[i..];
            let start = rest.find('>').unwrap() + 1;
            &rest[start..start + rest[start..].find('<').unwrap()]
        })
        .collect()
}
