//! Coalescing a device's metrics into as few read requests as the device allows.

use crate::profile::{Function, MetricRegister};

/// Protocol limit of registers in one read (function codes 03 and 04).
pub const MAX_REGISTERS_PER_READ: u16 = 125;
/// Protocol limit of bits in one read (function codes 01 and 02).
pub const MAX_BITS_PER_READ: u16 = 2000;

/// Limits that shape the reads of one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanLimits {
    pub max_registers: u16,
    pub max_bits: u16,
    /// Unused registers or bits that may be read to join two ranges.
    pub max_gap: u16,
    /// `false` issues one read per metric.
    pub coalesce: bool,
}

/// One read request and the metrics it serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadBlock {
    pub function: Function,
    pub address: u16,
    pub count: u16,
    /// Indices into the register list the plan was made from.
    pub metrics: Vec<usize>,
}

impl ReadBlock {
    fn end(&self) -> u32 {
        u32::from(self.address) + u32::from(self.count)
    }
}

/// Plans the reads for `registers`. Fails when one metric alone is wider than the device's
/// per-read limit, naming the metric.
pub fn plan_reads(
    registers: &[MetricRegister],
    limits: PlanLimits,
) -> Result<Vec<ReadBlock>, String> {
    let mut order: Vec<usize> = (0..registers.len()).collect();
    order.sort_by_key(|&i| {
        (
            registers[i].register.function,
            registers[i].register.address,
        )
    });

    let mut blocks: Vec<ReadBlock> = Vec::new();
    for index in order {
        let register = &registers[index].register;
        let limit = if register.function.is_bit() {
            limits.max_bits
        } else {
            limits.max_registers
        };
        if register.span > limit {
            return Err(format!(
                "metric `{}` spans {} registers but the device reads at most {limit} at once; \
                 raise max_registers_per_read or fix the profile",
                registers[index].metric, register.span
            ));
        }
        if let Some(block) = blocks
            .last_mut()
            .filter(|b| limits.coalesce && joins(b, register, limit, limits.max_gap))
        {
            let end = block.end().max(register.end());
            block.count = u16::try_from(end - u32::from(block.address))
                .expect("bounded by the per-read limit");
            block.metrics.push(index);
            continue;
        }
        blocks.push(ReadBlock {
            function: register.function,
            address: register.address,
            count: register.span,
            metrics: vec![index],
        });
    }
    Ok(blocks)
}

fn joins(block: &ReadBlock, register: &crate::profile::Register, limit: u16, max_gap: u16) -> bool {
    let near = u32::from(register.address) <= block.end() + u32::from(max_gap);
    let new_end = block.end().max(register.end());
    block.function == register.function
        && near
        && new_end - u32::from(block.address) <= u32::from(limit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MetricName;
    use crate::profile::RegisterSpec;

    fn metric(name: &str, function: &str, address: u16, data_type: &str) -> MetricRegister {
        let text =
            format!("function = \"{function}\"\naddress = {address}\ntype = \"{data_type}\"");
        let spec: RegisterSpec = toml::from_str(&text).expect("parses");
        MetricRegister {
            metric: MetricName::new(name),
            register: spec.check().expect("valid"),
        }
    }

    const LIMITS: PlanLimits = PlanLimits {
        max_registers: 125,
        max_bits: 2000,
        max_gap: 4,
        coalesce: true,
    };

    #[test]
    fn near_ranges_merge_and_far_ones_split() {
        let registers = [
            metric("a", "holding_register", 0, "f32"),
            metric("b", "holding_register", 2, "u16"),
            metric("c", "holding_register", 7, "u16"),
            metric("d", "holding_register", 20, "u32"),
            metric("e", "input_register", 0, "u16"),
        ];
        let blocks = plan_reads(&registers, LIMITS).expect("plans");
        let shape: Vec<(Function, u16, u16)> = blocks
            .iter()
            .map(|b| (b.function, b.address, b.count))
            .collect();
        assert_eq!(
            shape,
            [
                (Function::InputRegister, 0, 1),
                (Function::HoldingRegister, 0, 8),
                (Function::HoldingRegister, 20, 2)
            ]
        );
    }

    #[test]
    fn device_limit_splits_reads() {
        let registers: Vec<MetricRegister> = (0..10)
            .map(|i| metric(&format!("m{i}"), "input_register", i * 2, "f32"))
            .collect();
        let limits = PlanLimits {
            max_registers: 6,
            ..LIMITS
        };
        let blocks = plan_reads(&registers, limits).expect("plans");
        assert_eq!(blocks.len(), 4);
        assert!(blocks.iter().all(|b| b.count <= 6));
    }

    #[test]
    fn no_coalescing_reads_each_metric() {
        let registers: Vec<MetricRegister> = (0..5)
            .map(|i| metric(&format!("m{i}"), "coil", i, "bool"))
            .collect();
        let blocks = plan_reads(
            &registers,
            PlanLimits {
                coalesce: false,
                ..LIMITS
            },
        )
        .expect("plans");
        assert_eq!(blocks.len(), 5);
    }

    #[test]
    fn protocol_register_limit_at_its_edge() {
        // Registers 0 and 124 fit one read of exactly 125 registers, but 125 needs a second read.
        let at_edge = [
            metric("first", "holding_register", 0, "u16"),
            metric("last", "holding_register", 124, "u16"),
        ];
        let wide_gap = PlanLimits {
            max_gap: 200,
            ..LIMITS
        };
        let blocks = plan_reads(&at_edge, wide_gap).expect("plans");
        let shape: Vec<(u16, u16)> = blocks.iter().map(|b| (b.address, b.count)).collect();
        assert_eq!(shape, [(0, 125)]);

        let past_edge = [
            metric("first", "holding_register", 0, "u16"),
            metric("next", "holding_register", 125, "u16"),
        ];
        let blocks = plan_reads(&past_edge, wide_gap).expect("plans");
        let shape: Vec<(u16, u16)> = blocks.iter().map(|b| (b.address, b.count)).collect();
        assert_eq!(shape, [(0, 1), (125, 1)]);

        // A 32-bit value whose second register would be the 126th starts a new read.
        let straddling = [
            metric("first", "input_register", 0, "u16"),
            metric("wide", "input_register", 124, "u32"),
        ];
        let blocks = plan_reads(&straddling, wide_gap).expect("plans");
        let shape: Vec<(u16, u16)> = blocks.iter().map(|b| (b.address, b.count)).collect();
        assert_eq!(shape, [(0, 1), (124, 2)]);
    }

    #[test]
    fn protocol_bit_limit_at_its_edge() {
        let wide_gap = PlanLimits {
            max_gap: 3000,
            ..LIMITS
        };
        let at_edge = [
            metric("first", "coil", 0, "bool"),
            metric("last", "coil", 1999, "bool"),
        ];
        let blocks = plan_reads(&at_edge, wide_gap).expect("plans");
        let shape: Vec<(u16, u16)> = blocks.iter().map(|b| (b.address, b.count)).collect();
        assert_eq!(shape, [(0, 2000)]);

        let past_edge = [
            metric("first", "discrete_input", 0, "bool"),
            metric("next", "discrete_input", 2000, "bool"),
        ];
        let blocks = plan_reads(&past_edge, wide_gap).expect("plans");
        let shape: Vec<(u16, u16)> = blocks.iter().map(|b| (b.address, b.count)).collect();
        assert_eq!(shape, [(0, 1), (2000, 1)]);
    }

    #[test]
    fn metric_wider_than_limit_is_rejected() {
        let registers = [metric("energy", "holding_register", 0, "f64")];
        let error = plan_reads(
            &registers,
            PlanLimits {
                max_registers: 2,
                ..LIMITS
            },
        )
        .expect_err("too wide");
        assert!(error.contains("energy"), "{error}");
    }
}
