"""Reading SASS: the instruction counts and kernel names the design guards rely on."""

import pytest
from invcoss.kernels import sass

SAMPLE = """
        /*0080*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;
        /*0090*/                   LDG.E.128 R8, desc[UR4][R2.64+0x10] ;
        /*00a0*/                   LDG.E.64.CONSTANT R12, desc[UR4][R6.64] ;
        /*00b0*/                   LDG.E R14, desc[UR4][R6.64] ;
        /*00c0*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT ;
        /*00d0*/                   HMMA.16816.F32.BF16 R40, R4, R8, R40 ;
        /*00e0*/                   STL [R1], R3 ;
        /*00f0*/                   LDL R3, [R1] ;
        /*0100*/                   FFMA R3, R4, R5, R3 ;
"""


def test_facts_count_vector_loads_tensor_core_ops_and_local_memory():
    f = sass.facts(SAMPLE)
    assert (f.vector_loads, f.mma, f.local_ops) == (2, 2, 2)
    assert sass.facts("FFMA R1, R2, R3, R4 ;") == sass.SassFacts(0, 0, 0)


@pytest.mark.parametrize(
    "demangled, expected",
    [
        (
            "void invcoss::cuda::(anonymous namespace)::tv_forward_kernel<c10::BFloat16, float, unsigned int>"
            "(c10::BFloat16 const*, float*, long)",
            ("tv_forward_kernel", "bf16, fp32, u32"),
        ),
        (
            "void invcoss::cuda::loss_kernel<double>(double const*, long, double, double*)",
            ("loss_kernel", "fp64"),
        ),
        ("void plain_kernel(float*)", ("plain_kernel", "")),
        (
            "void ns::k<ns::Pair<float, int>, c10::Half>(float*)",
            ("k", "ns::Pair<float, int>, fp16"),
        ),
    ],
)
def test_split_name(demangled, expected):
    assert sass.split_name(demangled) == expected


def test_cuobjdump_is_found():
    assert sass.cuobjdump().endswith("cuobjdump")
