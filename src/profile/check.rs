//! Checks of a profile directory for `stonelion profiles check`, and the register overlap
//! check that profile loading shares.

use std::path::Path;

use super::{MetricRegister, ProfileSet};

/// Checks every `*.toml` profile in `dir` and returns one message per problem, each naming
/// the file, the metric and the fix. An empty list means every profile loads.
///
/// It reports unknown keys, duplicate metric or profile names, overlapping registers, types
/// longer than the span the profile gives them, and every other problem that stops loading.
pub fn check_dir(dir: &Path) -> Vec<String> {
    match ProfileSet::load_dir(dir) {
        Ok(set) if set.names().next().is_none() => vec![format!(
            "{}: no *.toml profiles found; point the check at the profile directory",
            dir.display()
        )],
        Ok(_) => Vec::new(),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

/// Finds metrics whose registers overlap within one object table.
///
/// Several metrics may share one 16-bit register when one of each pair reads the whole
/// register, or both read flags (`bit`) or fields (`bits`) that share no bit, which is how
/// packed status words are described.
pub fn overlaps(registers: &[MetricRegister]) -> Vec<String> {
    let mut sorted: Vec<&MetricRegister> = registers.iter().collect();
    sorted.sort_by_key(|r| (r.register.function, r.register.address));
    let mut problems = Vec::new();
    for (i, first) in sorted.iter().enumerate() {
        for second in &sorted[i + 1..] {
            let (a, b) = (&first.register, &second.register);
            if b.function != a.function || u32::from(b.address) >= a.end() {
                break;
            }
            if shares_status_word(first, second) {
                continue;
            }
            if let (Some(x), Some(y)) = (bit_mask(a), bit_mask(b))
                && a.address == b.address
            {
                problems.push(format!(
                    "metric `{}` and metric `{}` both read bits {} of {} {}; give each its \
                     own bits",
                    first.metric,
                    second.metric,
                    bit_list(x & y),
                    a.function.as_str(),
                    a.address,
                ));
                continue;
            }
            problems.push(format!(
                "metric `{}` ({} {}..{}) overlaps metric `{}` ({} {}..{}); fix one address or \
                 read single bits with `bit` or fields with `bits`",
                first.metric,
                a.function.as_str(),
                a.address,
                a.end() - 1,
                second.metric,
                b.function.as_str(),
                b.address,
                b.end() - 1,
            ));
        }
    }
    problems
}

fn shares_status_word(first: &MetricRegister, second: &MetricRegister) -> bool {
    let (a, b) = (&first.register, &second.register);
    let one_register = a.span == 1 && b.span == 1 && a.address == b.address && !a.function.is_bit();
    // A whole-register metric may share its word with flags and fields, because a status
    // word is often read both as a code and bit by bit. Two flags or fields must not share
    // a bit.
    let distinct_bits = match (bit_mask(a), bit_mask(b)) {
        (Some(x), Some(y)) => x & y == 0,
        (Some(_), None) | (None, Some(_)) => true,
        (None, None) => false,
    };
    one_register && distinct_bits
}

/// Lists the set bits of `mask`, such as `3, 4`.
fn bit_list(mask: u16) -> String {
    (0..16)
        .filter(|bit| mask >> bit & 1 == 1)
        .map(|bit: u16| bit.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Returns the bits of its register that a flag or packed field reads, or `None` for a
/// metric that reads the whole register.
fn bit_mask(register: &super::Register) -> Option<u16> {
    if let Some(bit) = register.bit {
        return Some(1 << bit);
    }
    let (first, last) = register.bits?;
    let width = u32::from(last - first) + 1;
    Some((u16::MAX >> (16 - width)) << first)
}
