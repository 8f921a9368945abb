"""casbin's policy table (the scene decisions' rows; `policies/enforcer.py` reads and writes it)."""

from __future__ import annotations

from sqlalchemy import Column, Integer, String
from sqlmodel import Field, SQLModel


class CasbinRule(SQLModel, table=True):
    """casbin's policy table, in the layout of casbin-sqlalchemy-adapter (which reads it)."""

    __tablename__ = "casbin_rule"

    id: int | None = Field(default=None, sa_column=Column(Integer, primary_key=True))
    ptype: str | None = Field(default=None, sa_column=Column(String(255)))
    v0: str | None = Field(default=None, sa_column=Column(String(255)))
    v1: str | None = Field(default=None, sa_column=Column(String(255), index=True))  # the domain: one scene
    v2: str | None = Field(default=None, sa_column=Column(String(255), index=True))  # the domain of `g` lines
    v3: str | None = Field(default=None, sa_column=Column(String(255)))
    v4: str | None = Field(default=None, sa_column=Column(String(255)))
    v5: str | None = Field(default=None, sa_column=Column(String(255)))

    def __str__(self) -> str:  # the adapter feeds this line to casbin
        values = [self.ptype]
        for v in (self.v0, self.v1, self.v2, self.v3, self.v4, self.v5):
            if v is None:
                break
            values.append(v)
        return ", ".join(values)
