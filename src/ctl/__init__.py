"""ctl: Complete the Look, scene-based complementary product recommendation."""

__version__ = "0.1.0"
