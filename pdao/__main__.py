from pdao.cli import app

app(prog_name="pdao")
