from pdao.cli.main import app

app(prog_name="pdao")
