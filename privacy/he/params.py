"""CKKS parameters checked against the HE standard's 128-bit table, and the constants every role shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Homomorphic Encryption Standard (2018), Table 1: largest total log2(q) (special prime included) for
#: 128-bit classical security with a uniform ternary secret, per ring dimension N.
SECURITY_TABLE_128: dict[int, int] = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}

#: Sums of up to this many worst-case contributions cannot wrap around the plaintext modulus.
MAX_SUMMANDS = 64

#: Default flooding noise (absolute std on the released weighted-mean values); see the module docstring.
DEFAULT_FLOODING_SIGMA = 1e-5

#: ``info`` label binding a sealed secret-key export to its purpose.
HE_SECRET_INFO = b"secure-fedkim/he-secret-context/v1"


@dataclass(frozen=True)
class CKKSParams:
    """CKKS parameters for a depth-0 (sum only) circuit, checked against the 128-bit HE standard table.

    ``coeff_mod_bit_sizes`` lists the data primes followed by the key-level special prime (TenSEAL needs
    one). Default: N = 4096, [60, 40] (100 bits <= 109), scale 2**36: see the module docstring.
    """

    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40)
    global_scale_bits: int = 36

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(int(b) for b in self.coeff_mod_bit_sizes))
        n = self.poly_modulus_degree
        if n not in SECURITY_TABLE_128:
            raise ValueError(f"poly_modulus_degree must be one of {sorted(SECURITY_TABLE_128)}, got {n}")
        _ = self.security_bits  # raises if the modulus is too large for 128-bit security
        if len(self.coeff_mod_bit_sizes) < 2:
            raise ValueError("coeff_mod_bit_sizes needs >= 2 primes: data prime(s) + the special prime")
        if any(not 20 <= b <= 60 for b in self.coeff_mod_bit_sizes):
            raise ValueError("each coefficient prime must have 20..60 bits (SEAL limit 60)")
        headroom = sum(self.data_prime_bits) - 1 - self.global_scale_bits
        if self.global_scale_bits < 20 or headroom < 8:
            raise ValueError(
                f"global_scale_bits={self.global_scale_bits} leaves {headroom} bits of value range in "
                f"the data primes {self.data_prime_bits}; need scale >= 20 bits and >= 8 bits of range"
            )

    @property
    def data_prime_bits(self) -> tuple[int, ...]:
        return self.coeff_mod_bit_sizes[:-1]

    @property
    def total_modulus_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes)

    @property
    def security_bits(self) -> int:
        """128, after checking total log q against the HE standard's 128-bit table; raises if exceeded."""
        limit = SECURITY_TABLE_128[self.poly_modulus_degree]
        if self.total_modulus_bits > limit:
            raise ValueError(
                f"total modulus {self.total_modulus_bits} bits exceeds {limit} bits, the HE standard's "
                f"128-bit classical security bound for N={self.poly_modulus_degree}"
            )
        return 128

    @property
    def global_scale(self) -> float:
        return float(2**self.global_scale_bits)

    @property
    def values_per_ciphertext(self) -> int:
        """Real values per ciphertext: N/2 complex slots x 2 (real and imaginary part)."""
        return self.poly_modulus_degree

    @property
    def max_abs_weighted_sum(self) -> float:
        """Largest |sum_i w_i u_i| a decrypted sum can represent without wrapping."""
        return float(2.0 ** (sum(self.data_prime_bits) - 1 - self.global_scale_bits))

    @property
    def ciphertext_expansion(self) -> float:
        """Ciphertext bytes / float32 bytes, SEAL headers excluded: 2 polys x N x 8 B x data primes / (N x 4 B)."""
        n = self.poly_modulus_degree
        return 2 * n * 8 * len(self.data_prime_bits) / (n * 4)

    def describe(self) -> dict[str, Any]:
        """Parameters for reports."""
        return {
            "scheme": "CKKS (TenSEAL/SEAL)",
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "total_modulus_bits": self.total_modulus_bits,
            "max_total_modulus_bits_128": SECURITY_TABLE_128[self.poly_modulus_degree],
            "global_scale": self.global_scale,
            "global_scale_bits": self.global_scale_bits,
            "security_level": f"{self.security_bits}-bit classical (HE standard, ternary secret)",
            "multiplicative_depth": 0,
            "values_per_ciphertext": self.values_per_ciphertext,
            "ciphertext_expansion": self.ciphertext_expansion,
            "max_abs_weighted_sum": self.max_abs_weighted_sum,
            "max_summands": MAX_SUMMANDS,
        }
