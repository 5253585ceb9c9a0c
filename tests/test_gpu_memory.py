"""GPU memory through NVML: this process's own usedGpuMemory picked by pid, the stated fall back to device-wide
memory where NVML cannot name the process, and a clear "not measured" where NVML is missing (this machine)."""
from __future__ import annotations

import os
import sys
import types
from collections import namedtuple


from recipec.profile import memory
from recipec.profile.memory import PeakMemory, describe_gpu_samples, own_gpu_bytes, own_pids

Proc = namedtuple("Proc", "pid usedGpuMemory")
ME = os.getpid()
MiB = 2**20


def test_own_memory_is_this_pids_entry():
    used, how = own_gpu_bytes([("GPU 0", Proc(1, 5 * MiB)), ("GPU 0", Proc(ME, 300 * MiB))], {ME})
    assert used == 300 * MiB and how == f"pid {ME} on GPU 0"


def test_contexts_on_two_devices_are_summed():
    used, how = own_gpu_bytes([("GPU 0", Proc(ME, 100)), ("GPU 1", Proc(ME, 20)), ("GPU 1", Proc(7, 999))], {ME})
    assert used == 120 and "GPU 0, GPU 1" in how


def test_a_pid_nvml_does_not_list_gives_none_and_says_why():
    used, why = own_gpu_bytes([("GPU 0", Proc(424242, 7 * MiB))], {ME})
    assert used is None and "424242" in why and "container" in why and "host" in why


def test_memory_nvml_cannot_report_gives_none_and_says_why():
    used, why = own_gpu_bytes([("GPU 0", Proc(ME, None))], {ME})
    assert used is None and "not available" in why


def test_own_pids_include_this_pid():
    assert ME in own_pids()


def test_descriptions_say_whose_memory_was_sampled():
    assert describe_gpu_samples(3, "pid 9 on GPU 0", 0, "", "GPU 0").startswith("this process's GPU memory")
    wide = describe_gpu_samples(0, "", 4, "pid 9 is not listed", "GPU 0")
    assert wide.startswith("device-wide") and "every process" in wide and "pid 9 is not listed" in wide
    mixed = describe_gpu_samples(3, "pid 9 on GPU 0", 1, "why", "GPU 0")
    assert "1 of 4 samples" in mixed
    assert "not measured" in describe_gpu_samples(0, "", 0, "", "GPU 0")


class FakeNvml(types.SimpleNamespace):
    """pynvml's calls the reader makes, over two GPUs without MIG."""

    class NVMLError(Exception):
        pass

    NVML_DEVICE_MIG_ENABLE = 1

    def __init__(self, processes):
        super().__init__(processes=processes, shutdowns=0)

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return f"h{i}"

    def nvmlDeviceGetMigMode(self, handle):
        raise self.NVMLError("Not Supported")

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return self.processes.get(handle, [])

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(used={"h0": 9000 * MiB, "h1": 1 * MiB}[handle])

    def nvmlShutdown(self):
        self.shutdowns += 1


def test_the_reader_finds_this_process_on_whichever_gpu_it_uses():
    nvml = FakeNvml({"h1": [Proc(ME, 512 * MiB), Proc(1, 64 * MiB)]})
    reader = memory.NvmlReader(nvml)
    assert reader.read() == 512
    assert reader.describe().startswith("this process's GPU memory") and "GPU 1" in reader.describe()


def test_the_reader_falls_back_to_the_ort_device_and_says_so(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nvml = FakeNvml({"h0": [Proc(123456, 64 * MiB)]})
    reader = memory.NvmlReader(nvml)
    assert reader.read() == 9000  # device-wide used memory of GPU 0, the CUDA provider's default device
    text = reader.describe()
    assert text.startswith("device-wide GPU memory in use on GPU 0") and "123456" in text
    reader.close()
    assert nvml.shutdowns == 1


def test_without_nvml_the_reader_says_so_instead_of_crashing():
    reader = memory._gpu_reader()  # this machine has no NVIDIA driver
    assert reader.read() is None
    assert reader.describe().startswith("GPU memory not measured") and "NVML" in reader.describe()
    reader.close()


def test_without_pynvml_the_reader_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    reader = memory._gpu_reader()
    assert reader.read() is None and "nvidia-ml-py" in reader.describe()


def test_peak_memory_on_cuda_without_nvml_reports_none_with_the_reason():
    with PeakMemory("cuda") as mem:
        bytearray(1 << 20)
    assert mem.peak_mb is None
    assert mem.source.startswith("GPU memory not measured") and "host process peak" in mem.source
