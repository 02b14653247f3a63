//! `--device cpu|cuda[:N]|metal[:N]` to a candle device. A GPU backend that was not
//! compiled in is a clear error, not a silent fallback to the CPU.

use candle_core::Device;

use crate::EngineError;

pub fn parse_device(spec: &str) -> Result<Device, EngineError> {
    let (kind, ordinal) = match spec.split_once(':') {
        Some((k, n)) => {
            let n: usize = n.parse().map_err(|_| {
                EngineError::Device(format!("`{spec}`: `{n}` is not a device number"))
            })?;
            (k, n)
        }
        None => (spec, 0),
    };
    match kind {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if !cfg!(feature = "cuda") {
                return Err(EngineError::Device(format!(
                    "`{spec}`: this build has no CUDA support (rebuild with `--features cuda`)"
                )));
            }
            Device::new_cuda(ordinal).map_err(|e| EngineError::Device(format!("`{spec}`: {e}")))
        }
        "metal" => {
            if !cfg!(feature = "metal") {
                return Err(EngineError::Device(format!(
                    "`{spec}`: this build has no Metal support (rebuild with `--features metal`)"
                )));
            }
            Device::new_metal(ordinal).map_err(|e| EngineError::Device(format!("`{spec}`: {e}")))
        }
        other => Err(EngineError::Device(format!(
            "unknown device `{other}` (expected cpu, cuda[:N] or metal[:N])"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_refuses_the_rest_clearly() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("tpu")
            .unwrap_err()
            .to_string()
            .contains("unknown device"));
        assert!(parse_device("cuda:x")
            .unwrap_err()
            .to_string()
            .contains("device number"));
        if !cfg!(feature = "cuda") {
            assert!(parse_device("cuda:0")
                .unwrap_err()
                .to_string()
                .contains("--features cuda"));
        }
    }
}
